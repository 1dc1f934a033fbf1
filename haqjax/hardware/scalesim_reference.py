"""The systolic target's scratchpad model against the `scalesim` package.

Each case runs one layer (a conv row of SCALE-Sim's topology format, or a
GEMM row of its `M, N, K` format) through SCALE-Sim's `single_layer_sim` with
`InterfaceBandwidth: USER` (in a temporary directory) and through
`haqjax.Systolic(bandwidth_mode='user')` at 8 bits, where a word is a
byte on both sides. `agreement()` gives the mean and max relative error of
total cycles (compute plus stall) and of the DRAM traffic over `CASES`, per
dataflow; `python -m experiments.bench hardware` prints it. Needs the
`scalesim` package (the `test` extra). Example::

    from haqjax.hardware import scalesim_reference
    summary, rows = scalesim_reference.agreement()
    summary["all"]["cycles"]  # (mean, max) absolute relative error
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import io
import os
import tempfile

import numpy as np

from haqjax.hardware import topology
from haqjax.hardware.cost import layer_costs
from haqjax.hardware.systolic import Systolic

CONV_HEADER = ("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, "
               "Channels, Num Filter, Strides,\n")
GEMM_HEADER = "Layer, M, N, K,\n"
# Conv rows (name, H, W, R, S, C, F, stride; padded IFMAP sizes, SCALE-Sim's
# columns) and GEMM rows (name, M, N, K). `copies`: the ifmap holds im2col
# copies of its words.
LAYERS = {"conv3x3": ("conv3x3", 10, 10, 3, 3, 8, 16, 1),
          "c3_s2": ("c3_s2", 13, 13, 3, 3, 8, 16, 2),
          "pw": ("pw", 8, 8, 1, 1, 32, 32, 1),
          "pw_s2": ("pw_s2", 11, 11, 1, 1, 16, 24, 2),
          "pw16": ("pw16", 6, 6, 1, 1, 64, 48, 1),
          "fc": ("fc", 40, 24, 48)}
COPIES = ("conv3x3", "c3_s2")
# (dataflow, rows, cols, SRAM KiB, bandwidth words/cycle, layer).
CASES = tuple((df, *arch)
              for df in ("os", "ws", "is")
              for arch in ((8, 8, 1, 4, "conv3x3"), (8, 8, 1, 2, "c3_s2"),
                           (16, 16, 1, 4, "pw"), (8, 8, 1, 4, "pw_s2"),
                           (4, 4, 1, 2, "fc"), (32, 32, 2, 8, "pw16"),
                           (128, 128, 8, 32, "pw16")))


def sample_cases(count: int, seed: int = 0) -> tuple[tuple, ...]:
  """`count` random cases: small conv layers (1x1 to 5x5 kernels, strides 1
  to 3, 1 to 24 channels) one in five a GEMM, on 4x4 to 32x32 arrays with 1
  to 4 KiB SRAMs and 1 to 8 words per cycle, in all three dataflows; each
  case is `(dataflow, rows, cols, KiB, bw, layer row)` as in `CASES`."""
  rng = np.random.default_rng(seed)
  pick = lambda values: values[int(rng.integers(len(values)))]
  cases = []
  for i in range(count):
    dataflow, size = pick(("os", "ws", "is")), pick((4, 8, 16, 32))
    kb, bw = pick((1, 2, 4)), pick((1, 2, 4, 8))
    if rng.random() < 0.2:
      layer = (f"g{i}", *(int(v) for v in rng.integers(8, 65, size=3)))
    else:
      kernel, stride = pick((1, 3, 3, 5)), pick((1, 1, 2, 3))
      h = int(rng.integers(kernel + 2, 17))
      layer = (f"c{i}", h, h, kernel, kernel, pick((1, 4, 8, 16)), pick((4, 8, 16, 24)),
               stride)
    cases.append((dataflow, size, size, kb, bw, layer))
  return tuple(cases)


def _max(*args, **kwargs):
  """`max` that gives a scalar for a one-element array (NumPy 2 refuses
  `int()` of one, which `scalesim` 3.0's buffers call)."""
  r = builtins.max(*args, **kwargs)
  return r.reshape(()).item() if isinstance(r, np.ndarray) and r.size == 1 else r


def write_layer(layer, workdir):
  """Writes `layer` as a one-row topology CSV; returns its path and format."""
  gemm = len(layer) == 4
  path = os.path.join(workdir, "gemm.csv" if gemm else "layer.csv")
  with open(path, "w") as f:
    f.write((GEMM_HEADER if gemm else CONV_HEADER)
            + ", ".join(str(v) for v in layer) + ",\n")
  return path, gemm


def run_scalesim(dataflow, rows, cols, kb, bw, layer, workdir):
  """SCALE-Sim's compute and stall cycles and DRAM words of one layer."""
  from scalesim.layout_utils import layouts  # pylint: disable=g-import-not-at-top
  from scalesim.memory import double_buffered_scratchpad_mem  # pylint: disable=g-import-not-at-top
  from scalesim.memory import read_buffer  # pylint: disable=g-import-not-at-top
  from scalesim.scale_config import scale_config  # pylint: disable=g-import-not-at-top
  from scalesim.single_layer_sim import single_layer_sim  # pylint: disable=g-import-not-at-top
  from scalesim.topology_utils import topologies  # pylint: disable=g-import-not-at-top
  read_buffer.max = double_buffered_scratchpad_mem.max = _max
  path, gemm = write_layer(layer, workdir)
  topo = topologies()
  topo.load_arrays(path, mnk_inputs=gemm)
  cfg = scale_config()
  cfg.array_rows, cfg.array_cols, cfg.df = rows, cols, dataflow
  cfg.ifmap_sz_kb = cfg.filter_sz_kb = cfg.ofmap_sz_kb = kb
  cfg.use_user_bandwidth, cfg.bandwidths = True, [bw]
  cfg.ifmap_sram_bank_bandwidth = cfg.filter_sram_bank_bandwidth = bw
  cfg.ifmap_sram_bank_num = cfg.filter_sram_bank_num = 1
  cfg.valid_conf_flag = True
  sim = single_layer_sim()
  sim.set_params(layer_id=0, config_obj=cfg, topology_obj=topo, layout_obj=layouts(),
                 verbose=False)
  with contextlib.redirect_stdout(io.StringIO()):
    sim.run()
    sim.calc_report_data()
  return {"compute_cycles": sim.compute_system.ifmap_demand_matrix.shape[0],
          "stall_cycles": sim.stall_cycles, "ifmap": sim.ifmap_dram_reads,
          "filter": sim.filter_dram_reads, "ofmap": sim.ofmap_dram_writes}


def run_haqjax(dataflow, rows, cols, kb, bw, layer, workdir):
  """haqjax's cycles and DRAM bytes of the same layer (roofline cycles too)."""
  path, _ = write_layer(layer, workdir)
  target = Systolic(rows=rows, cols=cols, dataflow=dataflow,
                             bandwidth_mode="user", ifmap_sram_bytes=kb * 1024,
                             filter_sram_bytes=kb * 1024, ofmap_sram_bytes=kb * 1024,
                             dram_bytes_per_cycle=float(bw))
  layers = topology.read_topology(path)
  roofline = dataclasses.replace(target, bandwidth_mode="roofline")
  c = layer_costs(target, layers, 8.0, 8.0)
  c = {k: float(np.asarray(v)[0]) for k, v in c.items()}
  return {"compute_cycles": c["compute_cycles"], "stall_cycles": c["stall_cycles"],
          "roofline_cycles": float(layer_costs(roofline, layers, 8.0, 8.0)[
              "cycles"][0]),
          "ifmap": c["ifmap_dram_bytes"], "filter": c["filter_dram_bytes"],
          "ofmap": c["ofmap_dram_bytes"]}


def relative_errors(s, h):
  """Signed relative errors of haqjax's `h` against SCALE-Sim's `s`."""
  total_s = s["compute_cycles"] + s["stall_cycles"]
  total_h = h["compute_cycles"] + h["stall_cycles"]
  errs = {"cycles": (total_h - total_s) / total_s,
          "roofline": (h["roofline_cycles"] - total_s) / total_s}
  for k in ("ifmap", "filter", "ofmap"):
    errs[k] = (h[k] - s[k]) / s[k]
  return errs


def agreement(cases=CASES, workdir=None):
  """Relative errors of haqjax against SCALE-Sim over `cases` (a case's last
  entry names a layer of `LAYERS` or is a layer row itself).

  Returns:
    `{dataflow or 'all': {quantity: (mean, max)}}` of absolute relative
    errors for 'cycles' (compute plus stall), 'roofline' (the roofline
    mode's cycles), 'ifmap', 'filter' and 'ofmap' (DRAM words), and the
    per-case rows `(case, scalesim, haqjax, errors)`.
  """
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in cases:
      *arch, layer = case
      layer = LAYERS[layer] if isinstance(layer, str) else layer
      s = run_scalesim(*arch, layer, workdir or tmp)
      h = run_haqjax(*arch, layer, workdir or tmp)
      rows.append((case, s, h, relative_errors(s, h)))
  summary = {}
  for group in ("os", "ws", "is", "all"):
    errs = [e for case, _, _, e in rows if group in (case[0], "all")]
    if errs:
      summary[group] = {k: (float(np.mean([abs(e[k]) for e in errs])),
                            float(np.max([abs(e[k]) for e in errs]))) for k in errs[0]}
  return summary, rows
