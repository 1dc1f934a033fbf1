"""Matmuls of two activations in the cost models, the search env and the bits plot."""

import numpy as np
import pytest

from haqjax import hardware
from haqjax.nn import layer_table
from haqjax.nn import quantized
from haqjax.report import plots
from haqjax.search import env
from nn_intercept_testing import HEADS
from nn_intercept_testing import TOKENS
from nn_intercept_testing import Encoder

BATCH = 4


@pytest.fixture(scope="module")
def table():
  return layer_table(quantized(Encoder()), (1, TOKENS, 4))


def test_a_matmul_is_per_example_gemms_without_weights(table):
  layers = hardware.from_layer_table(table, batch=BATCH)
  mm = np.array(table.is_matmul)
  assert mm.sum() == 2
  np.testing.assert_array_equal(np.asarray(layers.m)[mm], [TOKENS, TOKENS])
  np.testing.assert_array_equal(np.asarray(layers.groups)[mm], [BATCH * HEADS] * 2)
  np.testing.assert_array_equal(np.asarray(layers.weights)[mm], [0, 0])
  np.testing.assert_array_equal(np.asarray(layers.biases)[mm], [0, 0])
  # MACs and element counts scale with the batch for every kind.
  np.testing.assert_array_equal(layers.macs, BATCH * table.macs)
  # Dense rows keep the batch in their rows and their weights.
  dense = np.array([k == "dense" for k in table.kinds])
  np.testing.assert_array_equal(np.asarray(layers.m)[dense], BATCH * table.in_h[dense])
  np.testing.assert_array_equal(np.asarray(layers.weights)[dense], table.weight_count[dense])


def test_costs_charge_the_matmul_bits(table):
  layers = hardware.from_layer_table(table, batch=BATCH)
  target = hardware.get_target("bismo-edge")
  i = table.names.index("attention/qk")
  w, a = np.full(len(table), 4.0), np.full(len(table), 4.0)
  w_hi = w.copy()
  w_hi[i] = 8.0
  a_hi = a.copy()
  a_hi[i] = 8.0
  cost = lambda w, a, metric: float(hardware.policy_cost(target, layers, w, a, metric))
  # No stored weights: the size does not depend on the matmul's bits.
  assert cost(w_hi, a, "size") == cost(w, a, "size")
  # BitOps multiply the two operands' widths.
  assert cost(w_hi, a, "bitops") - cost(w, a, "bitops") == pytest.approx(
      float(layers.macs[i]) * 4 * 4)
  # A bit-serial accelerator runs longer on wider operands, either one.
  assert cost(w_hi, a, "latency") > cost(w, a, "latency")
  assert cost(w, a_hi, "latency") > cost(w, a, "latency")


@pytest.mark.parametrize("target", [
    hardware.get_target("bitfusion", memory="stream"),
    hardware.get_target("bitfusion", memory="tiled"),
    hardware.get_target("systolic"),
    hardware.get_target("systolic", bandwidth_mode="user"),
], ids=["bitfusion-stream", "bitfusion-tiled", "systolic-roofline", "systolic-user"])
def test_dram_models_fetch_the_second_operand(table, target):
  layers = hardware.from_layer_table(table, batch=BATCH)
  i = table.names.index("attention/pv")
  # Per example, the [tokens, tokens] x [tokens, head_dim] product of each head
  # reads its second operand, the values, like a kernel.
  head_dim = float(layers.n[i])
  second = BATCH * HEADS * TOKENS * head_dim
  assert float(layers.rhs_elems[i]) == second
  for bits in (8.0, 4.0):
    w = np.full(len(table), 8.0)
    w[i] = bits
    c = hardware.layer_costs(target, layers, w, np.full(len(table), 8.0))
    if "filter_dram_bytes" in c:
      # The simulators' models count the operand as their filter traffic.
      assert float(c["filter_dram_bytes"][i]) >= second * bits / 8
    else:
      # The estimates' traffic grows by the operand's bytes with its bits.
      hi = hardware.layer_costs(target, layers, np.full(len(table), 8.0),
                                np.full(len(table), 8.0))
      assert float(hi["dram_bytes"][i] - c["dram_bytes"][i]) == pytest.approx(
          second * (8 - bits) / 8)


def test_env_observes_matmuls(table):
  obs = env.observations(table, "linear")
  assert obs.shape == (2 * len(table), len(env.COLUMNS))
  params = env.COLUMNS.index("params")
  i = table.names.index("attention/pv")
  assert obs[2 * i, params] == 0.0  # No parameters: the column's minimum.
  assert np.isfinite(obs).all()
  bad = table.__class__(**{**table.__dict__, "kinds": ("attention",) + table.kinds[1:]})
  with pytest.raises(ValueError, match="kind of layer 0 .* is 'attention'"):
    env.observations(bad, "linear")
  with pytest.raises(ValueError, match="allowed: conv, depthwise, dense, matmul"):
    hardware.from_layer_table(bad)


def test_bits_plot_draws_matmuls(table):
  rows = table.rows()
  policy = {"layers": [{"name": r["name"], "w_bits": 4, "a_bits": 6} for r in rows]}
  fig = plots.policy_bits_figure(rows, policy, dpi=40)
  legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes]
  legend = [t.get_text() for leg in legends if leg for t in leg.get_texts()]
  assert "matmul of activations (2nd operand up)" in legend
