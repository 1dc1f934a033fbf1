"""The tiled Bit Fusion model against the Bit Fusion simulator's own numbers.

A reference file (JSON, e.g. `tests/data/bitfusion_reference.json`) holds runs
of the simulator (github.com/hsharma35/bitfusion, with its commit, config and
command) on the conv and FC layers of some networks:

  * `models`: per network, its layers as `[name, in_channels, out_channels,
    kernel, groups, in_hw, out_hw]` (square kernels and images);
  * `shapes`: the convolution each layer is to the simulator (one group's);
  * `columns` and `runs`: one row per shape, batch and `(w, a)`: total and
    stall cycles, energy (nJ) and its core, SRAM and DRAM parts, DRAM bits
    read and written, the chosen tile sizes and loop order.

`agreement(path)` rebuilds each network's `Layers`, costs it with
`BitFusion(memory='tiled')` and compares every layer with its shape's run
(times the layer's groups: the simulator has none, see
`haqjax.hardware.bitfusion_memory`). Example::

    from haqjax.hardware import bitfusion_reference
    a = bitfusion_reference.agreement("tests/data/bitfusion_reference.json")
    a["summary"]["conv_fc"]  # mean and max relative errors, cycles and energy
"""

from __future__ import annotations

import collections
import json

import jax.numpy as jnp
import numpy as np

from haqjax.hardware import cost
from haqjax.hardware.bitfusion import BitFusion
from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import make_layers

# Quantities compared: our cost key, the reference column, its scale to ours.
COMPARED = {"cycles": ("cycles", "cycles", 1.0),
            "stall_cycles": ("stall_cycles", "stall_cycles", 1.0),
            "energy": ("energy_j", "energy_nj", 1e-9),
            "compute_energy": ("compute_energy_j", "core_nj", 1e-9),
            "sram_energy": ("sram_energy_j", "sram_nj", 1e-9),
            "dram_energy": ("dram_energy_j", "dram_nj", 1e-9)}


def load(path: str) -> dict:
  """The reference file's JSON."""
  with open(path) as f:
    return json.load(f)


def layer_kind(index: int, row: list) -> str:
  """'first' (im2col), 'conv', 'pointwise', 'depthwise' or 'fc' for a model row."""
  _, _, _, kernel, groups, in_hw, out_hw = row
  if groups > 1:
    return "depthwise"
  if index == 0:
    return "first"
  if kernel == 1 and in_hw == out_hw == 1:
    return "fc"
  return "conv" if kernel > 1 else "pointwise"


def network_layers(ref: dict, batch: int) -> tuple[Layers, list[tuple[str, str, str]]]:
  """All networks' layers as one `Layers` (each network's first layer marked).

  Returns the layers and, per layer, `(network, shape key, kind)`.
  """
  rows, info, first = [], [], []
  for net, spec in ref["models"].items():
    for i, row in enumerate(spec["layers"]):
      rows.append(row)
      info.append((net, _shape_key(row, i == 0), layer_kind(i, row)))
      first.append(1.0 if i == 0 else 0.0)
  col = lambda j: [r[j] for r in rows]  # pylint: disable=g-long-lambda
  layers = make_layers(names=[f"{n}/{r[0]}" for (n, _, _), r in zip(info, rows)],
                       in_channels=col(1), out_channels=col(2), kernel_h=col(3),
                       kernel_w=col(3), groups=col(4), in_h=col(5), in_w=col(5),
                       out_h=col(6), out_w=col(6), batch=batch)
  return layers.replace(first=jnp.asarray(first, jnp.float32)), info


def _shape_key(row: list, first: bool) -> str:
  _, cin, cout, kernel, groups, in_hw, out_hw = row
  stride = max(in_hw // out_hw, 1)
  return (f"k{kernel}_o{out_hw}_s{stride}_ic{cin // groups}_oc{cout // groups}"
          + ("_im2col" if first else ""))


def agreement(path: str, target: BitFusion | None = None) -> dict:
  """Relative errors of `target` (default: the tiled model) per run and summed up.

  Returns a dict with `runs` (one entry per network layer, batch and `(w,
  a)` the file has: network, layer, kind, batch, bits, and per quantity of
  `COMPARED` the predicted value, the reference and `|pred / ref - 1|`) and
  `summary`: mean and max error of cycles and energy over the conv and FC
  layers (`conv_fc`), the depthwise layers, and by kind, bits and batch.
  """
  ref = load(path)
  target = target or BitFusion(memory="tiled")
  cols = ref["columns"]
  runs = {(r[0], r[1], r[2], r[3]): dict(zip(cols, r)) for r in ref["runs"]}
  bits = sorted({r[2] for r in ref["runs"]} | {r[3] for r in ref["runs"]})
  grid = jnp.asarray(bits, jnp.float32)
  out = []
  for batch in sorted({r[1] for r in ref["runs"]}):
    layers, info = network_layers(ref, batch)
    c = cost.layer_costs(target, layers, grid[:, None, None], grid[None, :, None])
    c = {k: np.asarray(v, np.float64) for k, v in c.items()}   # [W, A, L]
    groups = np.asarray(layers.groups, np.float64)
    for l, (net, key, kind) in enumerate(info):
      for i, w in enumerate(bits):
        for j, a in enumerate(bits):
          run = runs.get((key, batch, w, a))
          if run is None:
            continue
          entry = {"network": net, "layer": layers.names[l], "kind": kind,
                   "batch": batch, "w": w, "a": a}
          for q, (ours, theirs, scale) in COMPARED.items():
            pred = c[ours][i, j, l]
            want = run[theirs] * scale * groups[l]
            entry[q] = (pred, want, abs(pred / want - 1.0) if want else abs(pred))
          out.append(entry)
  return {"runs": out, "summary": summarize(out)}


def summarize(runs: list[dict]) -> dict:
  """Mean and max error of cycles and energy over groups of runs."""
  groups = collections.defaultdict(list)
  for r in runs:
    dw = r["kind"] == "depthwise"
    groups["depthwise" if dw else "conv_fc"].append(r)
    if not dw:
      groups[f"kind={r['kind']}"].append(r)
      groups[f"w{r['w']}a{r['a']}"].append(r)
      groups[f"batch={r['batch']}"].append(r)
  out = {}
  for name, rs in groups.items():
    out[name] = {"runs": len(rs)}
    for q in ("cycles", "energy"):
      err = np.asarray([r[q][2] for r in rs])
      out[name][f"{q}_mean_err"] = float(err.mean())
      out[name][f"{q}_max_err"] = float(err.max())
  return out
