"""The systolic target's scratchpad model against the `scalesim` package.

Each case runs one layer (a conv row of SCALE-Sim's topology format, or a
GEMM row of its `M, N, K` format) through SCALE-Sim's `single_layer_sim` with
`InterfaceBandwidth: USER` (in a temporary directory) and through
`haqjax.hardware.Systolic(bandwidth_mode='user')` at 8 bits, where a word is a
byte on both sides (`haqjax.hardware.scalesim_reference`, whose figures
`python -m experiments.bench hardware` prints).
"""

import dataclasses
import math

import numpy as np
import pytest

from haqjax import hardware
from haqjax.hardware import systolic_memory
from haqjax.hardware import systolic_window
from haqjax.hardware import topology
from haqjax.hardware.scalesim_reference import GEMM_HEADER
from haqjax.hardware.scalesim_reference import agreement
from haqjax.hardware.scalesim_reference import relative_errors
from haqjax.hardware.scalesim_reference import run_haqjax
from haqjax.hardware.scalesim_reference import run_scalesim
from haqjax.hardware.scalesim_reference import sample_cases
from haqjax.hardware.scalesim_reference import write_layer


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  pytest.importorskip("scalesim")
  return agreement(workdir=str(tmp_path_factory.mktemp("scalesim")))


def test_stall_free_cycles_equal(measured):
  for case, s, h, _ in measured[1]:
    assert h["compute_cycles"] == s["compute_cycles"], case


def test_reads_equal(measured):
  # The fold-by-fold walk of the window is SCALE-Sim's, window turns
  # included, so the DRAM words read are its own: for filters, GEMM inputs,
  # 1x1 layers and, address by address, for an input-stationary ifmap whose
  # im2col copies SCALE-Sim finds anywhere in the window (3x3 convs, whose
  # strides divide H - R).
  for case, s, h, _ in measured[1]:
    for k in ("ifmap", "filter"):
      assert h[k] == s[k], (case, k)


def test_writes_within_line_padding(measured):
  # SCALE-Sim counts the -1 padding of a drained write line except in its
  # last line: at most `bw` words more per drain than the words written.
  for case, s, h, _ in measured[1]:
    drain = case[3] * 1024 - math.ceil(case[3] * 1024 / 2)
    drains = math.ceil(h["ofmap"] / drain) + 1
    assert h["ofmap"] <= s["ofmap"] <= h["ofmap"] + drains * case[4], case


def test_total_cycles_agree(measured):
  # The target, total cycles within a few percent on average, and
  # far nearer SCALE-Sim than the roofline bound, in every dataflow.
  summary, rows = measured
  assert np.mean([abs(e["cycles"]) for _, _, _, e in rows]) < 0.05
  for df in ("os", "ws", "is"):
    assert summary[df]["cycles"][0] < summary[df]["roofline"][0] / 2, df


# Input-stationary convs with kernels over their stride (conv rows: name, H,
# W, R, S, C, F, stride) on small arrays: (rows, cols, SRAM KiB, words/cycle).
# Taking every copy as held missed the first two and the last by 86%, 83% and
# 81% of the ifmap words (54% and 68% of the cycles for the first two); the
# 4x8 array has rows != cols.
IM2COL_CASES = {
    "k3_s2_c16": ((8, 8, 1, 2), ("k3s2", 9, 9, 3, 3, 16, 8, 2)),
    "k5_s1_c4": ((8, 8, 1, 2), ("k5", 11, 11, 5, 5, 4, 8, 1)),
    "k3_c1_4x8": ((4, 8, 1, 1), ("k3c1", 16, 16, 3, 3, 1, 8, 1)),
    # 2 does not divide 12 - 3: the last outputs read past the input.
    "k3_s2_edge": ((8, 8, 1, 2), ("k3edge", 12, 12, 3, 3, 8, 8, 2)),
}


@pytest.mark.parametrize("name", sorted(IM2COL_CASES))
def test_input_stationary_im2col_reads_equal(name, tmp_path):
  # SCALE-Sim finds a demanded ifmap word in any line of its window, im2col
  # copies included: the window moves only for words none of whose copies it
  # holds, which `systolic_window` follows address by address.
  pytest.importorskip("scalesim")
  arch, layer = IM2COL_CASES[name]
  s = run_scalesim("is", *arch, layer, str(tmp_path))
  h = run_haqjax("is", *arch, layer, str(tmp_path))
  assert h["compute_cycles"] == s["compute_cycles"]
  assert h["ifmap"] == s["ifmap"] and h["filter"] == s["filter"]
  # Stalls follow SCALE-Sim's per block, not per cycle (systolic_memory's
  # docstring): its counted waits shift later rows by up to a prefetch time.
  assert abs(relative_errors(s, h)["cycles"]) < 0.15


def test_inside_positions_skip_the_words_past_the_input():
  # SCALE-Sim's input-stationary ifmap prefetch matrix, built as its
  # operand_matrix does (im2col, -1 past the input), fold by fold.
  h, w, kh, kw, ch, s, cols, batch = 8, 7, 3, 2, 2, 2, 4, 2
  ho, wo = math.ceil((h - kh + s) / s), math.ceil((w - kw + s) / s)
  k, m = kh * kw * ch, batch * ho * wo
  valid = np.zeros((m, k), bool)
  for p in range(m):
    oh, ow = divmod(p % (ho * wo), wo)
    for kk in range(k):
      r, c = divmod(kk // ch, kw)
      valid[p, kk] = oh * s + r < h and ow * s + c < w
  assert not valid.all()
  g = {"kernel_h": kh, "kernel_w": kw, "channels": ch, "stride": s, "in_h": h,
       "in_w": w, "out_h": ho, "out_w": wo}
  g = {name: np.float32(v) for name, v in g.items()}
  index = 0
  for f in range(math.ceil(m / cols)):
    width = min(cols, m - f * cols)
    for kk in range(k):
      for lane in range(width):
        if valid[f * cols + lane, kk]:
          got = systolic_window.inside_position(g, np.float32(f), np.float32(kk),
                                                np.float32(lane), np.float32(k),
                                                np.float32(width), cols)
          assert float(got) == index, (f, kk, lane)
          index += 1


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


def _scalesim_write_stalls(words, compute, sram, bw):
  """SCALE-Sim's `write_buffer` fed `words` writes spread evenly over
  `compute` rows, as `double_buffered_scratchpad_mem` feeds it."""
  from scalesim.memory.write_buffer import write_buffer  # pylint: disable=g-import-not-at-top
  from scalesim.memory.write_port import write_port  # pylint: disable=g-import-not-at-top
  buf = write_buffer()
  buf.set_params(backing_buf_obj=write_port(), total_size_bytes=sram, word_size=1,
                 active_buf_frac=0.5, backing_buf_bw=bw)
  per_row = np.diff(np.floor(np.arange(compute + 1) * words / compute)).astype(int)
  width = per_row.max()
  stall = 0
  for i, n in enumerate(per_row):
    line = np.full((1, width), -1.0)
    line[0, :n] = np.arange(n)
    cycle = np.array([[i + stall]], float)
    stall += int(buf.service_writes(line, cycle)[0, 0] - cycle[0, 0])
  return stall


# (written words, stall-free cycles, SRAM words, words/cycle): drains that keep
# up, a buffer that never fills, and drains outrun by the writes.
WRITES = [(4000, 2000, 1024, 4), (2352, 708, 2048, 1), (6000, 1000, 1024, 1),
          (30000, 8000, 2048, 2), (9000, 3000, 512, 1)]


@pytest.mark.parametrize("case", WRITES)
def test_write_buffer_stalls_follow_scalesims_drains(case):
  # The buffer credits a drain's words back when it starts: the old
  # estimate stalled the second case 624 cycles where SCALE-Sim has none.
  pytest.importorskip("scalesim")
  words, compute, sram, bw = case
  want = _scalesim_write_stalls(words, compute, sram, bw)
  _, got = systolic_memory.write_buffer(np.float32(words), np.float32(sram), np.float32(bw),
                                        np.float32(compute))
  assert abs(float(got) - want) <= 0.005 * (compute + want) + 2.0, (float(got), want)


def test_sampled_cases_are_valid_topology_rows(tmp_path):
  # The benchmark's random layers: reproducible, every dataflow, each a
  # row the topology reader takes (conv or GEMM format).
  cases = sample_cases(30)
  assert cases == sample_cases(30) and cases != sample_cases(30, seed=1)
  assert {c[0] for c in cases} == {"os", "ws", "is"}
  for case in cases:
    path, _ = write_layer(case[-1], str(tmp_path))
    layers = topology.read_topology(path)
    assert len(layers) == 1 and float(layers.macs[0]) > 0, case
