"""A small transformer of plain flax layers: attention matmuls quantized as ops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import layer_table
from haqjax.nn import quantized
from haqjax.policy import Policy
from haqjax.quant import MinMaxActivation
from haqjax.quant import MinMaxWeight
from haqjax.quant import QuantRule
from haqjax.quant import QuantScheme
from haqjax.quant import StaticRange
from nn_intercept_testing import DIM
from nn_intercept_testing import HEADS
from nn_intercept_testing import TOKENS
from nn_intercept_testing import Encoder
from nn_intercept_testing import random_variables
from nn_intercept_testing import strip_quantizers

SHAPE = (4, TOKENS, 4)


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)


@functools.partial(jax.jit, static_argnames="model")
def run(model, variables, x, policy):
  return model.apply(variables, x, policy=policy)


def test_table_lists_the_attention_matmuls():
  table = layer_table(quantized(Encoder()), SHAPE)
  assert table.names == ("embed", "attention/query", "attention/key", "attention/value",
                         "attention/qk", "attention/pv", "attention/out", "mlp", "head")
  assert table.kinds == ("dense",) * 4 + ("matmul",) * 2 + ("dense",) * 3
  qk, pv = table.rows()[4:6]
  head_dim = DIM // HEADS
  # qk: per head, [T, d] x [d, T]; pv: per head, [T, T] x [T, d]; no weights.
  assert qk["macs"] == pv["macs"] == HEADS * TOKENS * TOKENS * head_dim
  assert (qk["groups"], qk["in_channels"], qk["out_channels"], qk["in_h"]) == (
      HEADS, HEADS * head_dim, HEADS * TOKENS, TOKENS)
  assert (pv["in_channels"], pv["out_channels"]) == (HEADS * TOKENS, HEADS * head_dim)
  assert qk["params"] == pv["params"] == 0
  assert list(table.weight_count[4:6]) == [0, 0]
  # The projections are DenseGeneral layers of [DIM] -> [HEADS, head_dim].
  assert table.rows()[1]["params"] == DIM * DIM + DIM
  assert table.rows()[1]["in_h"] == TOKENS
  assert table.float_ops == ()


def test_output_changes_with_the_matmul_bits(images):
  model = quantized(Encoder())  # min-max quantizers: no calibration needed.
  variables = random_variables(model, images)
  names = layer_table(model, SHAPE).names
  base = Policy.uniform(names, 8, 8)
  out = run(model, variables, images, base)
  float_out = run(model, variables, images, None)
  assert not np.allclose(out, float_out, atol=1e-6)
  for op in ("attention/qk", "attention/pv"):
    i = names.index(op)
    for field in ("w_bits", "a_bits"):  # Each operand has its own width.
      bits = np.array(getattr(base, field))
      bits[i] = 2
      policy = base.replace(**{field: jnp.asarray(bits)})
      changed = run(model, variables, images, policy)
      assert np.abs(np.asarray(changed) - np.asarray(out)).max() > 1e-4, (op, field)


def test_calibration_records_both_operands(images):
  # Signed ranges calibrate under jit ('auto' decides the sign on the host).
  scheme = QuantScheme(weight=MinMaxWeight(), act=StaticRange(sign="signed"))
  model = quantized(Encoder(), scheme)
  variables = random_variables(model, images)
  names = layer_table(model, SHAPE).names
  calibrate_lib.clear_calibrators()
  calibrated = calibrate_lib.calibrate(model, variables, [images], Policy.uniform(names, 4, 6))
  policy = Policy.uniform(names, 8, 8)
  calibrated = calibrate_lib.calibrate(model, variables, [images], policy)
  # One recording and one calibration compiled for both policies.
  assert calibrate_lib.calibrator(model).trace_counts() == {"record": 1, "calibrate": 1}
  attention = calibrated["params"]["attention"]
  assert set(attention["qk"]) == set(attention["pv"]) == {"act_quant", "rhs_quant"}
  # pv's first operand is the softmax weights: a range within [-1, 1].
  weights = attention["pv"]["act_quant"]
  assert 0.0 < float(weights["hi"].max()) <= 1.0
  # The projections' outputs set the ranges: keys, values, and the queries
  # that flax's attention scales by 1 / sqrt(head_dim) before the product.
  _, state = jax.jit(lambda v: Encoder().apply(v, images, capture_intermediates=True))(
      strip_quantizers(variables))
  out = lambda name: np.abs(state["intermediates"]["attention"][name]["__call__"][0]).max()
  for op, role, want in (("qk", "act_quant", out("query") / np.sqrt(DIM // HEADS)),
                         ("qk", "rhs_quant", out("key")), ("pv", "rhs_quant", out("value"))):
    got = max(-float(attention[op][role]["lo"].min()), float(attention[op][role]["hi"].max()))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_rules_match_the_user_module_paths(images):
  scheme = QuantScheme(weight=MinMaxWeight(), act=MinMaxActivation(),
                       rules=(QuantRule(pattern="attention/(qk|pv)", act=StaticRange()),))
  shapes = jax.eval_shape(quantized(Encoder(), scheme).init, jax.random.key(0), images)
  params = shapes["params"]
  # Only the rule's ops hold (static-range) quantizer parameters.
  assert set(params["attention"]["qk"]) == {"act_quant", "rhs_quant"}
  assert "pv" in params["attention"]
  assert "act_quant" not in params["attention"]["query"]
  assert "act_quant" not in params["mlp"]
