"""HAWQ's sensitivities and ILP on plain flax models (`haqjax.nn.quantized`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import haqjax
from haqjax import models
from haqjax.hardware.budget import table_index
from haqjax.nn import pointwise
from haqjax.nn import quantized
from haqjax.nn.quantized import op_quantizers
from haqjax.search.hawq import sensitivity
from haqjax.search.hawq import wrapped
from haqjax.search.hawq.config import HawqConfig
from nn_intercept_resnet_test import ResNet
from nn_intercept_resnet_test import SCHEME
from nn_intercept_testing import random_variables

HAWQ = HawqConfig(hawq_bits="2,4,8", hawq_probes=2, hawq_max_iterations=1,
                  hawq_batches=1)


class PlainCNN(nn.Module):
  """Conv, BatchNorm, a depthwise conv and a head, as a user writes them."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=2, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=4)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class TinyAttention(nn.Module):
  """Patch embedding, one attention block and a head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=3, padding="VALID", name="embed")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attention")(y, y)
    return nn.Dense(3, name="head")(x.mean(axis=1))


def _arrays(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = y[:, None, None, None] - 1.0 + 0.3 * rng.standard_normal((n, 6, 6, 1))
  return x.astype(np.float32), y


def _search(model, **kwargs):
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
  return haqjax.search_policy(
      model, variables, _arrays(32, 0), _arrays(16, 1), method="hawq", hawq=HAWQ,
      batch_size=16, eval_batch_size=16, finetune_epochs=0, **kwargs)


def test_hawq_searches_a_plain_cnn():
  result = _search(PlainCNN(), budget="w4a4", target="bitfusion", metric="energy")
  names = result.table.names
  assert result.policy.names == names == ("Conv_0", "Conv_1", "Dense_0")
  assert result.table.kinds == ("conv", "depthwise", "dense")
  assert result.fits and result.cost <= result.limit * (1 + 1e-9)
  assert set(np.asarray(result.policy.w_bits).tolist()) <= {2, 4, 8}
  traces = np.asarray(result.search["weight_traces"])
  assert traces.shape == (3,) and np.all(np.isfinite(traces)) and np.any(traces != 0)


def test_hawq_covers_the_attention_matmuls():
  result = _search(TinyAttention(), budget="w4a4")
  names, kinds = result.table.names, result.table.kinds
  assert result.policy.names == names
  assert {"attention/qk", "attention/pv"} <= set(names)
  assert [k for n, k in zip(names, kinds) if n.endswith(("/qk", "/pv"))] == ["matmul"] * 2
  assert result.fits and result.cost <= result.limit * (1 + 1e-9)
  # Every layer, the matmuls' two operands included, has a measured sensitivity.
  for role in ("weight_traces", "activation_traces"):
    traces = np.asarray(result.search[role])
    assert traces.shape == (len(names),) and np.all(np.isfinite(traces))
    assert traces[names.index("attention/qk")] != 0
    assert traces[names.index("attention/pv")] != 0


def test_a_matmul_is_measured_by_its_two_operands():
  """qk's "weight" is the keys it multiplies: their perturbation, error and Omega."""
  model = quantized(TinyAttention(), SCHEME)
  x, y = _arrays(8, 3)
  variables = haqjax.nn.init_quantizers(model, model.model.init(
      jax.random.key(0), jnp.zeros((1, 6, 6, 1))), jnp.asarray(x))
  batches = [{"image": jnp.asarray(x), "label": jnp.asarray(y)}]
  recorded = sensitivity.record(model, variables, batches)
  keys = recorded["attention/qk"]["rhs_inputs"]  # [B, T, heads, head dim]
  assert keys.shape == (8, 4, 2, 4)
  names = tuple(recorded)
  point = wrapped.trace_point(model, variables, names,
                              {n: r["path"] for n, r in recorded.items()}, batches[0]["image"])
  assert set(point["operand"]) == {"attention/qk", "attention/pv"}
  assert "attention/qk" not in point["kernel"] and "head" in point["kernel"]
  assert point["operand"]["attention/qk"].shape == keys.shape
  assert point["input"]["attention/qk"].shape == recorded["attention/qk"]["inputs"].shape
  # The loss at the zero point is the float model's; the operand moves it.
  loss = jax.jit(wrapped.layer_loss(
      model, variables, {n: r["path"] for n, r in recorded.items()},
      lambda logits, labels: jnp.mean(logits[:, 0])))
  base = model.apply(variables, batches[0]["image"], train=False)
  np.testing.assert_allclose(loss(point, batches[0]), jnp.mean(base[:, 0]), rtol=1e-6)
  moved = jax.tree.map(lambda v: v, point)
  # Not a constant: softmax ignores a shift shared by all keys.
  moved["operand"]["attention/qk"] = jnp.asarray(np.random.default_rng(0).normal(
      size=keys.shape), jnp.float32)
  assert abs(float(loss(moved, batches[0]) - loss(point, batches[0]))) > 1e-6
  w_mse, a_mse = sensitivity.quantization_mse(jax.random.key(1), variables, recorded,
                                              num_batches=1, w_bits=(4,), a_bits=(2,))
  qk = names.index("attention/qk")
  _, rhs_q = op_quantizers(SCHEME, "attention/qk", "matmul")
  bits = jnp.int32(4)
  want = jnp.mean(jnp.square(rhs_q(rhs_q.calibrate(rhs_q.init(keys), keys, bits), keys,
                                   bits) - keys))
  np.testing.assert_allclose(w_mse[qk, table_index(4)], want, rtol=1e-5)
  assert np.isinf(w_mse[qk, table_index(2)]) and np.isfinite(a_mse[qk, table_index(2)])


def test_traces_equal_the_haqjax_resnet_s(monkeypatch):
  """The plain ResNet twin gets the haqjax network's traces, probe for probe."""
  monkeypatch.setattr(pointwise, "MATMUL_BACKENDS", ())
  shape = (4, 8, 8, 3)
  haq = models.CifarResNet(stage_sizes=(1, 1), widths=(4, 8), quant_scheme=SCHEME)
  plain = quantized(ResNet(stage_sizes=(1, 1), widths=(4, 8)), SCHEME)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=shape), jnp.float32)
  variables = random_variables(haq, images)
  batches = [{"image": images, "label": jnp.asarray(rng.integers(0, 10, shape[0]))}]
  run = lambda m, c="hessian": sensitivity.hessian_traces(
      jax.random.key(0), m, variables, batches, probes=2, tol=0.0, max_iterations=1,
      curvature=c)
  want, got = run(haq), run(plain)
  assert got.names == want.names and len(got.names) == 7
  gn_want, gn_got = run(haq, "gauss_newton"), run(plain, "gauss_newton")
  np.testing.assert_allclose(gn_got.weight, gn_want.weight, rtol=1e-5)
  np.testing.assert_allclose(gn_got.activation, gn_want.activation, rtol=1e-5)
  assert np.all(gn_want.weight > 0) and np.all(gn_want.activation > 0)
  np.testing.assert_array_equal(got.weight_count, want.weight_count)
  np.testing.assert_array_equal(got.activation_count, want.activation_count)
  np.testing.assert_allclose(got.weight, want.weight, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.activation, want.activation, rtol=1e-5, atol=1e-7)
  assert np.all(want.weight != 0)
  # The errors use the same quantizers on the same inputs.
  w_haq, a_haq = sensitivity.quantization_mse(
      jax.random.key(1), variables, sensitivity.record(haq, variables, batches),
      num_batches=1, w_bits=(4,), a_bits=(4,))
  w_plain, a_plain = sensitivity.quantization_mse(
      jax.random.key(1), variables, sensitivity.record(plain, variables, batches),
      num_batches=1, w_bits=(4,), a_bits=(4,))
  np.testing.assert_allclose(w_plain, w_haq, rtol=1e-6)
  np.testing.assert_allclose(a_plain, a_haq, rtol=1e-6)
