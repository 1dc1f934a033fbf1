"""Tests of conv strides in the systolic scratchpad model.

A model's layers carry their strides into `Layers`, so a strided conv built
from a model costs what the same conv costs from a SCALE-Sim topology (whose
figures `tests/hardware_scalesim_memory_test.py` checks against the
`scalesim` package); a weight-stationary ifmap whose last outputs read past
the input is placed on SCALE-Sim's diagonals; and the scratchpad model gets
the geometry only where costs depend on it.
"""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.hardware import model_layers
from haqjax.hardware import systolic_window
from haqjax.hardware import systolic_fold_window
from haqjax.hardware import topology
from haqjax.hardware.scalesim_reference import relative_errors
from haqjax.hardware.scalesim_reference import run_haqjax
from haqjax.hardware.scalesim_reference import run_scalesim
from haqjax.nn import QConv
from haqjax.nn import layer_table


def test_zoo_model_layers_carry_its_strides():
  table = layer_table(models.create("resnet20", num_classes=10), (1, 32, 32, 3))
  layers = hardware.from_layer_table(table)
  assert set(table.stride) == {1, 2}
  np.testing.assert_array_equal(layers.stride, table.stride)
  # A 3x3 stride-2 SAME conv of a 32x32 input reads 33 rows (one of
  # padding): SCALE-Sim's IFMAP for 16 outputs; a 1x1 one reads 31.
  i = layers.names.index("layer2_0/conv1")
  assert float(layers.in_h[i]) == 33 and float(layers.in_w[i]) == 33
  assert float(layers.in_elems[i]) == 32 * 32 * 16
  j = layers.names.index("layer2_0/downsample")
  assert float(layers.in_h[j]) == 31
  fc = layers.names.index("fc")
  assert float(layers.stride[fc]) == 1 and float(layers.in_h[fc]) == 1


@pytest.mark.parametrize("size,out,kernel,stride,extent,fits", [
    (32, 16, 3, 2, 33, True),   # SAME: one row of padding
    (12, 5, 3, 2, 11, True),    # VALID: the last row is never read
    (14, 14, 3, 1, 16, True),   # SAME at stride 1
    (14, 14, 3, 2, 29, False),  # a side of stride 1 under a stride of 2
    (14, 4, 3, 2, 9, False),    # a side of stride 3 under a stride of 2
])
def test_read_extent(size, out, kernel, stride, extent, fits):
  e, f = model_layers.read_extent(size, out, kernel, stride)
  assert (int(e), bool(f)) == (extent, fits)


class _Conv(nn.Module):
  features: int
  kernel: int
  stride: int
  padding: str

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    return QConv(self.features, (self.kernel, self.kernel), strides=self.stride,
                 padding=self.padding, name="conv")(x, policy)


# (model input side, channels, filters, kernel, stride, padding) and the
# SCALE-Sim topology row of the same conv (its IFMAP the padded input read).
CASES = {
    "k3_s2_same": ((8, 16, 8, 3, 2, "SAME"), ("c", 9, 9, 3, 3, 16, 8, 2)),
    "k5_s1_same": ((7, 4, 8, 5, 1, "SAME"), ("c", 11, 11, 5, 5, 4, 8, 1)),
    "k3_s2_valid": ((12, 8, 8, 3, 2, "VALID"), ("c", 11, 11, 3, 3, 8, 8, 2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_strided_conv_from_a_model_costs_as_its_topology(name):
  (side, ch, filters, kernel, stride, padding), row = CASES[name]
  model = _Conv(filters, kernel, stride, padding)
  layers = hardware.from_layer_table(layer_table(model, (1, side, side, ch)))
  cells = ", ".join(str(v) for v in row)
  ref = topology.topology_layers(topology.parse_topology(
      ",".join(topology.COLUMNS) + "\n" + cells + "\n"))
  target = hardware.Systolic(rows=8, cols=8, dataflow="is", bandwidth_mode="user",
                             ifmap_sram_bytes=1024, filter_sram_bytes=1024,
                             ofmap_sram_bytes=1024, dram_bytes_per_cycle=2.0)
  got = hardware.layer_costs(target, layers, 8.0, 8.0)
  want = hardware.layer_costs(target, ref, 8.0, 8.0)
  for k in ("compute_cycles", "stall_cycles", "ifmap_dram_bytes", "filter_dram_bytes",
            "ofmap_dram_bytes"):
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _im2col_inside(h, w, kh, kw, ch, s, batch):
  """`[pixels, k]`: True where SCALE-Sim's im2col word lies inside the input
  (its conv topology's `ceil((H - R + s) / s)` outputs a side), and the
  geometry."""
  ho, wo = math.ceil((h - kh + s) / s), math.ceil((w - kw + s) / s)
  k, m = kh * kw * ch, batch * ho * wo
  inside = np.zeros((m, k), bool)
  for p in range(m):
    oh, ow = divmod(p % (ho * wo), wo)
    for kk in range(k):
      r, c = divmod(kk // ch, kw)
      inside[p, kk] = oh * s + r < h and ow * s + c < w
  g = {"kernel_h": kh, "kernel_w": kw, "channels": ch, "stride": s, "in_h": h,
       "in_w": w, "out_h": ho, "out_w": wo}
  return inside, {n: np.float32(v) for n, v in g.items()}


def _stack(inside, rows):
  """Folds of `rows` columns of `inside` `[height, width]`, stacked."""
  height, width = inside.shape
  folds = math.ceil(width / rows)
  stack = np.zeros((folds * height, rows), bool)
  for f in range(folds):
    part = inside[:, f * rows:(f + 1) * rows]
    stack[f * height:(f + 1) * height, :part.shape[1]] = part
  return stack, height, folds, width - (folds - 1) * rows


def _weight_stationary_stack(h, w, kh, kw, ch, s, rows, batch):
  """SCALE-Sim's weight-stationary ifmap folds, stacked (`create_ifmap_prefetch_mat`
  before its roll-out): True where the im2col word lies inside the input."""
  inside, g = _im2col_inside(h, w, kh, kw, ch, s, batch)
  stack, m, folds, last = _stack(inside, rows)
  return stack, g, m, folds, last


# (H, W, R, S, C, stride, array rows, batch): the last outputs read past the
# input in all but the fourth; the last fold is narrower in the second.
STACKS = [(14, 14, 3, 3, 8, 2, 8, 1), (8, 7, 3, 2, 2, 2, 4, 2), (12, 12, 1, 1, 16, 2, 8, 1),
          (10, 10, 3, 3, 3, 1, 8, 2), (6, 9, 3, 3, 2, 2, 4, 1)]


@pytest.mark.parametrize("shape", STACKS)
def test_stack_diagonals_count_inside_words(shape):
  # SCALE-Sim rolls the stack out diagonal by diagonal (row + column) and
  # its lines skip the words past the input.
  stack, g, m, folds, last = _weight_stationary_stack(*shape)
  rows = shape[6]
  r, c = np.indices(stack.shape)
  d = np.arange(folds * m + rows + 1, dtype=np.float32)
  got = jax.jit(systolic_window.stack_diagonals, static_argnums=5)(
      g, d, np.float32(m), np.float32(folds), np.float32(last), rows)
  np.testing.assert_array_equal(got, [stack[r + c < x].sum() for x in d])
  f = np.arange(folds, dtype=np.float32)
  width = np.where(f == folds - 1, last, rows).astype(np.float32)
  lo, hi = jax.jit(systolic_window.weight_stationary_span)(g, f, np.float32(m), width,
                                                          np.float32(rows))
  spans = []
  for i in range(folds):
    on = np.nonzero(stack[i * m:(i + 1) * m])
    spans.append(((on[0] + i * m + on[1]).min(), (on[0] + i * m + on[1]).max()))
  np.testing.assert_array_equal(np.stack([lo, hi], axis=-1), spans)


# Weight-stationary convs whose last outputs read past the input, on 8x8
# arrays with 1 KiB SRAMs and 2 words/cycle (conv rows as in CASES): the
# window walk placed their ifmap folds as if no word were -1, reading 171%
# and 133% more ifmap words than SCALE-Sim.
WS_EDGE = {"c8": ("c8", 14, 14, 3, 3, 8, 8, 2), "c4": ("c4", 14, 14, 3, 3, 4, 8, 2)}


def test_weight_stationary_ifmap_with_words_past_the_input(tmp_path):
  pytest.importorskip("scalesim")
  s = run_scalesim("ws", 8, 8, 1, 2, WS_EDGE["c8"], str(tmp_path))
  h = run_haqjax("ws", 8, 8, 1, 2, WS_EDGE["c8"], str(tmp_path))
  assert h["ifmap"] == s["ifmap"] and h["filter"] == s["filter"]
  assert abs(relative_errors(s, h)["cycles"]) < 0.05
  # SCALE-Sim finds every inside word of the last fold (kernel row 2) as a
  # copy in the fold before (row 0 of the pixel below), and skips the one
  # move of P = 512 words that reaches it, as the address walk does.
  s = run_scalesim("ws", 8, 8, 1, 2, WS_EDGE["c4"], str(tmp_path))
  h = run_haqjax("ws", 8, 8, 1, 2, WS_EDGE["c4"], str(tmp_path))
  assert h["ifmap"] == s["ifmap"] and h["filter"] == s["filter"]


# 14x14 5x5 stride-2 convs (8 and 16 channels, 16 filters; conv rows as in
# CASES) on a 16x16 array with 2 KiB SRAMs and 4 words/cycle: each input
# word is read by up to nine kernel positions, in folds far apart. The
# fold-level walk took no copies and read 154% and 22% more ifmap words than
# SCALE-Sim (69% and 22% more cycles).
WS_COPIES = (("a", 14, 14, 5, 5, 8, 16, 2), ("b", 14, 14, 5, 5, 16, 16, 2))


def test_weight_stationary_ifmap_copies_serve_the_demand(tmp_path):
  # SCALE-Sim finds a demanded word in any line of its window, so a copy of
  # it in another fold skips a move: `systolic_fold_window` follows the demand
  # address by address. Stalls follow SCALE-Sim per fold, not per cycle
  # (systolic_memory's docstring): within 5% of its cycles (1.1% and 0.6%).
  pytest.importorskip("scalesim")
  want = [run_scalesim("ws", 16, 16, 2, 4, row, str(tmp_path)) for row in WS_COPIES]
  path = tmp_path / "copies.csv"
  path.write_text(",".join(topology.COLUMNS) + "\n"
                  + "".join(", ".join(map(str, row)) + "\n" for row in WS_COPIES))
  t = hardware.Systolic(rows=16, cols=16, dataflow="ws", bandwidth_mode="user",
                        ifmap_sram_bytes=2048, filter_sram_bytes=2048, ofmap_sram_bytes=2048,
                        dram_bytes_per_cycle=4.0)
  got = hardware.layer_costs(t, topology.read_topology(str(path)), 8.0, 8.0)
  for i, s in enumerate(want):
    assert float(got["ifmap_dram_bytes"][i]) == s["ifmap"], WS_COPIES[i]
    assert float(got["filter_dram_bytes"][i]) == s["filter"], WS_COPIES[i]
    total = s["compute_cycles"] + s["stall_cycles"]
    assert abs(float(got["cycles"][i]) - total) < 0.05 * total, WS_COPIES[i]


def test_scratchpad_geometry_only_where_costs_depend_on_it():
  # The geometry changes costs only through the address walks (im2col
  # copies: an input-stationary ifmap's, a rolled one whose kernel exceeds
  # its stride) and words past the input; elsewhere the model is compiled
  # without it, with the same costs.
  shapes = dict(names=["a", "b"], in_channels=[8, 8], out_channels=[8, 8], kernel_h=[3, 1],
                kernel_w=[3, 1], groups=[1, 1], in_h=[9, 9], in_w=[9, 9], out_h=[4, 5],
                out_w=[4, 5], batch=1)
  layers = hardware.make_layers(stride=[2, 2], **shapes)  # no word past the input
  edge = hardware.make_layers(stride=[2, 2], **{**shapes, "in_h": [10, 10], "in_w": [10, 10],
                                                "out_h": [5, 6], "out_w": [5, 6]})
  pointwise = hardware.make_layers(
      stride=[2], **{k: v[1:] if isinstance(v, list) else v for k, v in shapes.items()})
  target = lambda df: hardware.Systolic(rows=4, cols=4, dataflow=df, bandwidth_mode="user",
                                        ifmap_sram_bytes=256, filter_sram_bytes=256,
                                        ofmap_sram_bytes=256, dram_bytes_per_cycle=2.0)
  for df in ("os", "ws"):
    assert target(df).scratchpad_geometry(edge) is not None
  for df in ("os", "ws", "is"):
    assert target(df).scratchpad_geometry(layers) is not None  # 3x3: im2col copies
    assert target(df).scratchpad_geometry(pointwise) is None   # 1x1: none
  kept = []
  jax.jit(lambda l: kept.append(target("os").scratchpad_geometry(l)) or l.m)(layers)
  assert kept[0] is not None  # traced layers keep it


def test_costs_without_the_geometry_are_the_same(monkeypatch, tmp_path):
  # A weight-stationary conv with no word past the input and no word read
  # twice (12x12, 3x3, stride 3): the model skips its geometry; forcing it
  # changes nothing.
  path = tmp_path / "c.csv"
  path.write_text(",".join(topology.COLUMNS) + "\nc, 12, 12, 3, 3, 8, 8, 3\n")
  layers = topology.read_topology(str(path))
  t = hardware.Systolic(rows=8, cols=8, dataflow="ws", bandwidth_mode="user",
                        ifmap_sram_bytes=1024, filter_sram_bytes=1024, ofmap_sram_bytes=1024,
                        dram_bytes_per_cycle=2.0)
  assert t.scratchpad_geometry(layers) is None
  skipped = hardware.layer_costs(t, layers, 8.0, 8.0)
  monkeypatch.setattr(hardware.Systolic, "scratchpad_geometry",
                      lambda self, layers: layers.conv_geometry)
  kept = hardware.layer_costs(t, layers, 8.0, 8.0)
  for k in skipped:
    np.testing.assert_array_equal(skipped[k], kept[k], err_msg=k)


# Stacks without words past the input (the fourth of STACKS among them):
# (H, W, R, S, C, stride, array rows, batch); the second's last fold is
# narrower, the third's kernel is wider than tall.
GAPLESS = [(10, 10, 3, 3, 3, 1, 8, 2), (9, 9, 3, 3, 5, 1, 4, 1), (7, 11, 3, 5, 2, 2, 8, 1)]


@pytest.mark.parametrize("shape", GAPLESS)
def test_gapless_position_is_the_diagonal_count(shape):
  stack, g, m, folds, last = _weight_stationary_stack(*shape)
  assert stack[:(folds - 1) * m].all() and stack[(folds - 1) * m:, :last].all()
  rows = shape[6]
  r, c = (i.astype(np.float32) for i in np.nonzero(stack))
  args = (np.float32(m), np.float32(folds), np.float32(last), rows)
  got = jax.jit(systolic_fold_window.gapless_position, static_argnums=5)(r, c, *args)
  want = jax.jit(systolic_window.stack_diagonals, static_argnums=5)(
      g, r + c, *args, below=r)
  np.testing.assert_array_equal(got, want)
  # The stack read out diagonal by diagonal, highest row first.
  order = np.lexsort((-r, r + c))
  np.testing.assert_array_equal(np.asarray(got)[order], np.arange(r.size))


# Weight-stationary convs inside their input with a kernel over its stride,
# as (array, SRAM KiB, words/cycle, conv row as in CASES). Each input word is
# read in several folds; the fold-level walk took no copies and read 75%,
# 233%, 75% and 120% more ifmap words than SCALE-Sim, the last (a ResNet-20
# layer's shape on a 32x32 array with 64 KiB SRAMs) at 104% more cycles.
WS_OVERLAP = [(16, 2, 2, ("a", 9, 9, 3, 3, 8, 16, 1)), (4, 1, 4, ("b", 11, 11, 5, 5, 1, 16, 1)),
              (8, 1, 2, ("c", 15, 15, 3, 3, 4, 8, 2)),
              (32, 64, 10, ("d", 10, 10, 3, 3, 64, 64, 1))]


def test_overlapping_weight_stationary_costs_traced_or_not(tmp_path):
  # The walk runs whether the layers are concrete (the geometry kept by
  # `scratchpad_geometry`) or traced.
  path = tmp_path / "d.csv"
  path.write_text(",".join(topology.COLUMNS) + "\nd, 10, 10, 3, 3, 64, 64, 1\n")
  layers = topology.read_topology(str(path))
  t = hardware.Systolic(rows=32, cols=32, dataflow="ws", bandwidth_mode="user",
                        ifmap_sram_bytes=65536, filter_sram_bytes=65536,
                        ofmap_sram_bytes=65536, dram_bytes_per_cycle=10.0)
  concrete = t.layer_cost(layers, np.float32(8.0), np.float32(8.0))
  traced = hardware.layer_costs(t, layers, 8.0, 8.0)
  for k in ("stall_cycles", "ifmap_dram_bytes"):
    np.testing.assert_array_equal(concrete[k], traced[k], err_msg=k)
  # SCALE-Sim: 163,850 ifmap words (the fold walk read 360,470).
  np.testing.assert_array_equal(concrete["ifmap_dram_bytes"], [163850.0])


def _output_stationary_stack(h, w, kh, kw, ch, s, rows, batch):
  """SCALE-Sim's output-stationary ifmap folds, stacked: fold `f` holds the
  im2col matrix's `k` columns as rows over the pixels `f rows ...`."""
  inside, g = _im2col_inside(h, w, kh, kw, ch, s, batch)
  stack, k, folds, last = _stack(inside.T, rows)
  return stack, g, k, folds, last


# (H, W, R, S, C, stride, array rows, batch): outputs past the input in the
# first two; the second's last fold is narrower.
OS_STACKS = [(14, 14, 3, 3, 2, 2, 8, 1), (10, 9, 3, 3, 3, 2, 4, 2), (9, 9, 3, 3, 2, 1, 8, 1)]


@pytest.mark.parametrize("shape", OS_STACKS)
def test_output_stationary_positions_follow_the_diagonals(shape):
  stack, g, k, folds, last = _output_stationary_stack(*shape)
  rows = shape[6]
  r, c = (i.astype(np.float32) for i in np.nonzero(stack))
  got = jax.jit(systolic_fold_window.stack_position, static_argnums=(6, 7, 8))(
      g, r, c, np.float32(k), np.float32(folds), np.float32(last), rows, False, "os")
  # The inside words read out diagonal by diagonal, highest row first.
  order = np.lexsort((-r, r + c))
  np.testing.assert_array_equal(np.asarray(got)[order], np.arange(r.size))


# Output-stationary strided convs whose last outputs read past the input and
# whose ifmap barely exceeds the read window, as (array, SRAM KiB,
# words/cycle, conv row as in CASES): SCALE-Sim serves most of the demand
# from im2col copies in the window; the fold walk read 400% and 250% more
# ifmap words.
OS_GAPPED = [(32, 8, 16, ("a", 10, 10, 3, 3, 32, 64, 2)), (8, 4, 1, ("b", 15, 15, 5, 5, 4, 16, 3))]


# (dataflow, case, cycles tolerance): the address walks against SCALE-Sim.
# The ResNet-20 shape ("d") is also an output-stationary conv inside its
# input, whose fold walk read 175% more ifmap words.
ADDRESS_WALKS = ([("ws", case, 0.01) for case in WS_OVERLAP]
                 + [("os", case, 0.1) for case in (*OS_GAPPED, WS_OVERLAP[-1])])


@pytest.mark.parametrize("walk", ADDRESS_WALKS, ids=lambda w: f"{w[0]}_{w[1][3][0]}")
def test_address_walks_read_scalesims_words(walk, tmp_path):
  pytest.importorskip("scalesim")
  dataflow, (size, kb, bw, layer), tolerance = walk
  s = run_scalesim(dataflow, size, size, kb, bw, layer, str(tmp_path))
  h = run_haqjax(dataflow, size, size, kb, bw, layer, str(tmp_path))
  assert h["ifmap"] == s["ifmap"] and h["filter"] == s["filter"]
  assert abs(relative_errors(s, h)["cycles"]) < tolerance
