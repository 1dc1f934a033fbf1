r"""Per-layer hardware costs of a network, as CSV.

  python -m haqjax.hardware --target=systolic --array=32x32 --dataflow=os \
      --topology=FILE.csv --w_bits=8 --a_bits=8
  python -m haqjax.hardware --target=bismo-cloud --model=mobilenetv2 \
      --input_size=224 --num_classes=100 --w_bits=4 --a_bits=4
  python -m haqjax.hardware --target=bismo-edge --policy=WORKDIR/policy.json
  python -m haqjax.hardware --target=systolic --config=scale.cfg --topology=layers.csv
  python -m haqjax.hardware --target=cim --array=128x128 --cell_bits=2 \
      --adc_bits=5 --cols_per_adc=8 --dac_bits=1 --model=resnet18 --w_bits=4

The network is a SCALE-Sim v2 topology CSV (`--topology`) or a model of
`haqjax.models` (`--model`). The bits are uniform (`--w_bits`, `--a_bits`) or
a per-layer policy JSON (`--policy`, e.g. a search's `policy.json`, whose
model, classes and input size are taken from the file unless given). Prints one row per layer,
`layer,macs,cycles,compute_cycles,stall_cycles,utilization,dram_bytes,energy_pj,
compute_energy_pj,sram_energy_pj,dram_energy_pj` (`cycles` is the total:
compute plus stall cycles; `energy_pj` the sum of its compute, on-chip SRAM
and DRAM parts), then a `total` row; a cost the target does not model is left
empty. Each column but `macs` and `utilization` is a budget metric of the
search (`--budget_metric`: cycles, compute_cycles, stall_cycles, dram, energy,
compute_energy, sram_energy, dram_energy). With `--config` (a SCALE-Sim
`.cfg` file, systolic only) the array, SRAM sizes, dataflow and bandwidth
come from the file; flags given explicitly (`--array`, `--dataflow`,
`--bit_mode`, `--memory`, `--batch`) override the file. `--memory` picks the
memory model: Bit Fusion's `tiled` (its simulator's loop tiling, the default)
or `stream`; the systolic array's `roofline` (the default), `user` or `calc`
(SCALE-Sim's double-buffered scratchpads at the `.cfg`'s bandwidth or at the
one that never stalls). The models of the simulators end each row with the DRAM
traffic per operand, `ifmap_dram_bytes,filter_dram_bytes,ofmap_dram_bytes`
(and `dram_bytes_per_cycle_needed` under `calc`). Mistakes print one line to
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import sys

import numpy as np

HEADER = ("layer", "macs", "cycles", "compute_cycles", "stall_cycles", "utilization",
          "dram_bytes", "energy_pj", "compute_energy_pj", "sram_energy_pj",
          "dram_energy_pj")
# Columns appended when the target reports them (systolic 'user'/'calc').
MEMORY_COLUMNS = ("ifmap_dram_bytes", "filter_dram_bytes", "ofmap_dram_bytes",
                  "dram_bytes_per_cycle_needed")
# Columns in picojoules and the cost keys (joules) they print.
_PJ_COLUMNS = {"energy_pj": "energy_j", "compute_energy_pj": "compute_energy_j",
               "sram_energy_pj": "sram_energy_j", "dram_energy_pj": "dram_energy_j"}

# Fields that --array=RxC sets, per target type.
_ARRAY_FIELDS = {"Systolic": ("rows", "cols"), "Bismo": ("dm", "dn"),
                 "BitFusion": ("rows", "cols"), "Cim": ("rows", "cols")}
# The field that --memory sets and its values, per target type.
_MEMORY_FIELDS = {"BitFusion": ("memory", ("tiled", "stream")),
                  "Systolic": ("bandwidth_mode", ("roofline", "user", "calc"))}


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m haqjax.hardware", description=__doc__.split("\n")[0])
  p.add_argument("--target", default="systolic",
                 help="bismo-edge, bismo-cloud, bitfusion, systolic, cim or table:PATH.npy")
  p.add_argument("--array", help="array size RxC (systolic: PE rows x cols; "
                 "bismo: Dm x Dn; bitfusion: rows x cols; cim: crossbar rows x cols)")
  p.add_argument("--dataflow", help="systolic dataflow: os, ws or is")
  p.add_argument("--bit_mode", help="systolic bit mode: parallel, stripes, loom or fused")
  p.add_argument("--memory", help="memory model: bitfusion: tiled (the simulator's, "
                 "default) or stream; systolic: roofline (default), user or calc "
                 "(SCALE-Sim's scratchpads at a user or a computed bandwidth)")
  p.add_argument("--config", help="SCALE-Sim .cfg file (systolic): array, SRAMs, "
                 "dataflow and bandwidth; --array/--dataflow/--bit_mode/--batch "
                 "given explicitly override it")
  from haqjax.hardware import cim  # pylint: disable=g-import-not-at-top
  for field in cim.FLAG_FIELDS:
    default = getattr(cim.CIM, field)
    p.add_argument(f"--{field}", type=type(default),
                   help=f"cim: Cim.{field} (default {default:g})")
  p.add_argument("--topology", help="SCALE-Sim v2 topology CSV file")
  p.add_argument("--model", help="a haqjax model name (e.g. mobilenetv2, resnet18)")
  p.add_argument("--input_size", type=int, help="model input height = width")
  p.add_argument("--num_classes", type=int, default=1000, help="model classifier outputs")
  p.add_argument("--w_bits", type=int, default=8, help="weight bits of every layer (1..8, 32)")
  p.add_argument("--a_bits", type=int, default=8, help="activation bits of every layer (1..8, 32)")
  p.add_argument("--policy", help="per-layer bits: a policy JSON file (replaces "
                 "--w_bits/--a_bits)")
  p.add_argument("--batch", type=int, help="batch size (default: the target preset's)")
  return p


def _read_policy(args: argparse.Namespace) -> dict | None:
  """The policy file's JSON; fills --model/--num_classes/--input_size from it."""
  if args.policy is None:
    return None
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(args.policy) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"--policy file {args.policy!r} does not exist") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"--policy file {args.policy!r} is not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise ValueError(f"--policy file {args.policy!r}: expected a policy object")
  if args.model is None and args.topology is None and d.get("model"):
    args.model = d["model"]
    if d.get("num_classes"):
      args.num_classes = int(d["num_classes"])
    if d.get("input_shape") and args.input_size is None:
      args.input_size = int(d["input_shape"][0])
  return d


def _bits(name: str, v: int) -> int:
  if not (1 <= v <= 8 or v == 32):
    raise ValueError(f"--{name} is {v}; allowed: 1..8, or 32 for floating point")
  return v


def _array(text: str) -> tuple[int, int]:
  parts = text.lower().split("x")
  if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--array is {text!r}; allowed: ROWSxCOLS, e.g. 32x32")
  return int(parts[0]), int(parts[1])


def build(args: argparse.Namespace):
  """(target, layers) from parsed flags."""
  from haqjax.hardware import base  # pylint: disable=g-import-not-at-top
  from haqjax.hardware import model_layers  # pylint: disable=g-import-not-at-top
  from haqjax.hardware import targets  # pylint: disable=g-import-not-at-top
  from haqjax.hardware import topology  # pylint: disable=g-import-not-at-top

  target = targets.get_target(args.target)
  kind = type(target).__name__
  changes = {}
  if args.config is not None:
    if kind != "Systolic":
      raise ValueError("--config applies to --target=systolic only")
    from haqjax.hardware import scale_config  # pylint: disable=g-import-not-at-top
    changes.update(scale_config.read_scale_config(args.config).systolic_fields())
  if args.array is not None:
    if kind not in _ARRAY_FIELDS:
      raise ValueError(f"--array does not apply to --target={args.target}")
    changes.update(zip(_ARRAY_FIELDS[kind], _array(args.array)))
  for flag in ("dataflow", "bit_mode"):
    if getattr(args, flag) is not None:
      if kind != "Systolic":
        raise ValueError(f"--{flag} applies to --target=systolic only")
      changes[flag] = getattr(args, flag)
  if args.memory is not None:
    if kind not in _MEMORY_FIELDS:
      raise ValueError(f"--memory applies to --target=bitfusion or systolic, "
                       f"not {args.target}")
    field, allowed = _MEMORY_FIELDS[kind]
    if args.memory not in allowed:
      raise ValueError(f"--memory is {args.memory!r}; allowed for --target={args.target}: "
                       f"{', '.join(allowed)}")
    changes[field] = args.memory
  from haqjax.hardware import cim  # pylint: disable=g-import-not-at-top
  for field in cim.FLAG_FIELDS:
    if getattr(args, field) is not None:
      if kind != "Cim":
        raise ValueError(f"--{field} applies to --target=cim only")
      changes[field] = getattr(args, field)
  if args.batch is not None and args.batch < 1:
    raise ValueError(f"--batch is {args.batch}; allowed: a positive integer")
  if changes:
    target = base.replace(target, **changes)
  batch = args.batch or target.batch
  if (args.topology is None) == (args.model is None):
    raise ValueError("give exactly one of --topology=FILE.csv and --model=NAME")
  if args.topology is not None:
    layers = topology.read_topology(args.topology, batch=batch)
  else:
    if args.num_classes < 1:
      raise ValueError(f"--num_classes is {args.num_classes}; allowed: a positive integer")
    layers = model_layers.from_model(args.model, input_size=args.input_size,
                                     num_classes=args.num_classes, batch=batch)
  return target, layers


def rows(target, layers, w_bits, a_bits) -> list[list[str]]:
  """The CSV rows (header, layers, total); bits are scalars or `[L]` arrays."""
  from haqjax.hardware import cost  # pylint: disable=g-import-not-at-top
  n = len(layers)
  w = np.broadcast_to(np.asarray(w_bits, np.float32), (n,))
  a = np.broadcast_to(np.asarray(a_bits, np.float32), (n,))
  c = cost.layer_costs(target, layers, w, a)
  c = {k: np.asarray(v, np.float64) for k, v in c.items()}
  macs = np.asarray(layers.macs, np.float64)
  cols = {"macs": macs}
  header = list(HEADER) + [k for k in MEMORY_COLUMNS if k in c]
  for key in header[2:]:
    if key in _PJ_COLUMNS:
      cols[key] = c[_PJ_COLUMNS[key]] * 1e12 if _PJ_COLUMNS[key] in c else None
    else:
      cols[key] = c.get(key)
  total = {k: (None if v is None else v.sum()) for k, v in cols.items()}
  if cols["utilization"] is not None:
    total["utilization"] = (cols["utilization"] * cols["cycles"]).sum() / cols["cycles"].sum()

  def fmt(key, v):
    if v is None:
      return ""
    return f"{v:.4f}" if key in ("utilization", "dram_bytes_per_cycle_needed") else f"{v:.0f}"

  if "dram_bytes_per_cycle_needed" in c:
    total["dram_bytes_per_cycle_needed"] = cols["dram_bytes"].sum() / cols["compute_cycles"].sum()
  out = [header]
  for i, name in enumerate(layers.names):
    out.append([name] + [fmt(k, None if v is None else v[i]) for k, v in cols.items()])
  out.append(["total"] + [fmt(k, v) for k, v in total.items()])
  return out


def main(argv: list[str] | None = None) -> int:
  try:
    args = _parser().parse_args(argv)
    w = _bits("w_bits", args.w_bits)
    a = _bits("a_bits", args.a_bits)
    policy = _read_policy(args)
    target, layers = build(args)
    if policy is not None:
      from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
      p = Policy.from_dict(policy, layers.names, source=f"--policy {args.policy}")
      w, a = np.asarray(p.w_bits), np.asarray(p.a_bits)
    table = rows(target, layers, w, a)
  except ValueError as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    return 2
  csv.writer(sys.stdout, lineterminator="\n").writerows(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
