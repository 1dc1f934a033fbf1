"""The systolic target's scratchpad model against the `scalesim` package.

Each case runs one layer (a conv row of SCALE-Sim's topology format, or a
GEMM row of its `M, N, K` format) through SCALE-Sim's `single_layer_sim` with
`InterfaceBandwidth: USER` (in a temporary directory) and through
`haqjax.hardware.Systolic(bandwidth_mode='user')` at 8 bits, where a word is a
byte on both sides. The figure of the benchmark is `agreement()`:

  python tests/hardware_scalesim_memory_test.py

prints the mean and max relative error of total cycles (compute plus stall)
and of the DRAM traffic over `CASES`, per dataflow.
"""

import builtins
import contextlib
import dataclasses
import io
import math
import os
import tempfile

import numpy as np
import pytest

from haqjax import hardware
from haqjax.hardware import topology

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
  target = hardware.Systolic(rows=rows, cols=cols, dataflow=dataflow,
                             bandwidth_mode="user", ifmap_sram_bytes=kb * 1024,
                             filter_sram_bytes=kb * 1024, ofmap_sram_bytes=kb * 1024,
                             dram_bytes_per_cycle=float(bw))
  layers = topology.read_topology(path)
  roofline = dataclasses.replace(target, bandwidth_mode="roofline")
  c = hardware.layer_costs(target, layers, 8.0, 8.0)
  c = {k: float(np.asarray(v)[0]) for k, v in c.items()}
  return {"compute_cycles": c["compute_cycles"], "stall_cycles": c["stall_cycles"],
          "roofline_cycles": float(hardware.layer_costs(roofline, layers, 8.0, 8.0)[
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
  """Relative errors of haqjax against SCALE-Sim over `cases`.

  Returns:
    `{dataflow or 'all': {quantity: (mean, max)}}` of absolute relative
    errors for 'cycles' (compute plus stall), 'roofline' (the roofline
    mode's cycles), 'ifmap', 'filter' and 'ofmap' (DRAM words), and the
    per-case rows `(case, scalesim, haqjax, errors)`.
  """
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in cases:
      *arch, name = case
      s = run_scalesim(*arch, LAYERS[name], workdir or tmp)
      h = run_haqjax(*arch, LAYERS[name], workdir or tmp)
      rows.append((case, s, h, relative_errors(s, h)))
  summary = {}
  for group in ("os", "ws", "is", "all"):
    errs = [e for case, _, _, e in rows if group in (case[0], "all")]
    if errs:
      summary[group] = {k: (float(np.mean([abs(e[k]) for e in errs])),
                            float(np.max([abs(e[k]) for e in errs]))) for k in errs[0]}
  return summary, rows


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  pytest.importorskip("scalesim")
  return agreement(workdir=str(tmp_path_factory.mktemp("scalesim")))


def test_stall_free_cycles_equal(measured):
  for case, s, h, _ in measured[1]:
    assert h["compute_cycles"] == s["compute_cycles"], case


def test_reads_without_im2col_copies_equal(measured):
  # Filters, GEMM inputs and the inputs of 1x1 layers hold each word once:
  # the fold-by-fold walk of the window is SCALE-Sim's, window turns
  # included, so the DRAM words read are its own.
  for case, s, h, _ in measured[1]:
    operands = ("filter",) if case[-1] in COPIES else ("ifmap", "filter")
    for k in operands:
      assert h[k] == s[k], (case, k)


def test_writes_within_line_padding(measured):
  # SCALE-Sim counts the -1 padding of a drained write line except in its
  # last line: at most `bw` words more per drain than the words written.
  for case, s, h, _ in measured[1]:
    drain = case[3] * 1024 - math.ceil(case[3] * 1024 / 2)
    drains = math.ceil(h["ofmap"] / drain) + 1
    assert h["ofmap"] <= s["ofmap"] <= h["ofmap"] + drains * case[4], case


def test_total_cycles_agree(measured):
  # The target, total cycles within a few percent on average, where
  # each input word is read once; with im2col copies (systolic_memory's
  # docstring) far nearer SCALE-Sim than the roofline bound, as everywhere.
  summary, rows = measured
  alone = [abs(e["cycles"]) for case, _, _, e in rows if case[-1] not in COPIES]
  assert np.mean(alone) < 0.05
  for df in ("os", "ws", "is"):
    assert summary[df]["cycles"][0] < summary[df]["roofline"][0] / 2, df


def reversed_tile_moves(k, n, rows, cols, sram):
  """Window moves of SCALE-Sim's `read_buffer` logic (hashed lines, cyclic
  window, moves until a hit) over a weight-stationary filter, whose tiles
  are read last row first: a reference for layers too large to simulate."""
  e, active = math.ceil(sram / 100), math.ceil(sram / 2)
  lines = k * n // e + 1
  a = math.ceil(active / e)
  step = min(math.ceil((sram - active) / e), lines - a)
  start, moves = 0, 0
  for fc in range(math.ceil(n / cols)):
    w = min(cols, n - fc * cols)
    for fr in range(math.ceil(k / rows)):
      for r in reversed(range(min(rows, k - fr * rows))):
        first = fc * k * cols + (fr * rows + r) * w
        for line in sorted({x // e for x in range(first, first + w)}):
          while lines > a and (line - start) % lines >= a:
            start, moves = (start + step) % lines, moves + 1
  return moves


@pytest.mark.parametrize("k,n,rows,cols,kb", [
    (4608, 512, 32, 32, 64), (1152, 64, 16, 16, 4), (300, 70, 8, 8, 1)])
def test_walk_follows_the_window_on_large_layers(k, n, rows, cols, kb):
  layers = hardware.make_layers(names=["l"], in_channels=[k], out_channels=[n],
                                kernel_h=[1], kernel_w=[1], groups=[1], in_h=[7],
                                in_w=[7], out_h=[7], out_w=[7], batch=1)
  t = hardware.Systolic(rows=rows, cols=cols, dataflow="ws", bandwidth_mode="user",
                        ifmap_sram_bytes=kb * 1024, filter_sram_bytes=kb * 1024,
                        ofmap_sram_bytes=kb * 1024, dram_bytes_per_cycle=16.0)
  words = float(hardware.layer_costs(t, layers, 8.0, 8.0)["filter_dram_bytes"][0])
  half = kb * 1024 // 2
  assert words == half + reversed_tile_moves(k, n, rows, cols, kb * 1024) * half


def test_the_model_is_a_traced_function_of_bits():
  layers = hardware.make_layers(names=["l"], in_channels=[16], out_channels=[16],
                                kernel_h=[3], kernel_w=[3], groups=[1], in_h=[10],
                                in_w=[10], out_h=[8], out_w=[8], batch=1)
  t = hardware.Systolic(rows=8, cols=8, bandwidth_mode="user", ifmap_sram_bytes=1024,
                        filter_sram_bytes=1024, ofmap_sram_bytes=1024,
                        dram_bytes_per_cycle=2.0)
  table = np.asarray(hardware.cost_tensor(t, layers, metric="cycles"))
  assert table.shape == (1, 8, 8) and np.isfinite(table).all()
  # Fewer bits: more words per SRAM and per cycle, never more cycles.
  assert table[0, 1, 1] <= table[0, 7, 7]
  dram = np.asarray(hardware.cost_tensor(t, layers, metric="dram"))
  assert dram[0, 3, 3] < dram[0, 7, 7]
  calc = dataclasses.replace(t, bandwidth_mode="calc")
  c = hardware.layer_costs(calc, layers, 8.0, 8.0)
  assert float(c["stall_cycles"][0]) == 0.0
  assert float(c["dram_bytes_per_cycle_needed"][0]) > 0


def test_gemm_topology(tmp_path):
  path = tmp_path / "gemm.csv"
  path.write_text(GEMM_HEADER + "fc1, 128, 64, 256,\nfc2, 10, 3, 7\n")
  layers = topology.read_topology(str(path), batch=2)
  assert layers.names == ("fc1", "fc2")
  np.testing.assert_array_equal(layers.m, [256, 20])
  np.testing.assert_array_equal(layers.n, [64, 3])
  np.testing.assert_array_equal(layers.k, [256, 7])
  np.testing.assert_array_equal(layers.in_elems, [2 * 128 * 256, 2 * 10 * 7])
  with pytest.raises(ValueError, match="fmt is 'csv'; allowed: conv, gemm"):
    topology.read_topology(str(path), fmt="csv")


@pytest.mark.parametrize("row,msg", [
    ("fc, 0, 3, 4,", r"g.csv:2: M is 0; allowed: a positive integer"),
    ("fc, 3, x, 4,", r"g.csv:2: N is 'x'; allowed: a positive integer"),
    ("fc, 3, 4", r"g.csv:2: has 3 fields; expected 4: Layer, M, N, K")])
def test_gemm_topology_errors(row, msg):
  with pytest.raises(ValueError, match=msg):
    topology.parse_gemm_topology(GEMM_HEADER + row + "\n", "g.csv")


if __name__ == "__main__":
  results, table = agreement()
  for case, s, h, e in table:
    print(case, " ".join(f"{k}={v:+.3f}" for k, v in e.items()))
  for group, errs in results.items():
    print(group, "  ".join(f"{k}: mean {m:.4f} max {x:.4f}" for k, (m, x) in errs.items()))
