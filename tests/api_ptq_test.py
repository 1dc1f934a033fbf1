"""haqjax.ptq.ptq on plain flax models: the haqjax-layer twin's results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.nn import init_quantizers
from haqjax.nn import layer_table
from haqjax.nn import pointwise
from haqjax.nn import quantized
from haqjax.policy import Policy
from haqjax.quant import MinMaxWeight
from haqjax.quant import QuantScheme
from haqjax.quant import StaticRange
from haqjax.ptq import PTQOptions
from haqjax.ptq import bias_correction
from haqjax.ptq import folding
from haqjax.ptq import ptq
from haqjax.ptq import wrapped
from nn_intercept_resnet_test import ResNet
from nn_intercept_testing import random_variables
from nn_intercept_testing import strip_quantizers

SHAPE = (16, 8, 8, 3)


@pytest.fixture(scope="module")
def twins():
  """(haqjax ResNet, the plain ResNet (unwrapped), variables, calibration, eval data)."""
  haq = models.CifarResNet(stage_sizes=(1, 1), widths=(4, 8))
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(64, *SHAPE[1:])), jnp.float32)
  variables = random_variables(haq, images[:1])
  labels = jnp.argmax(haq.apply(variables, images, policy=None), -1)  # FP32: 100%
  calibration = [{"image": images[:16]}, {"image": images[16:32]}]
  plain = ResNet(stage_sizes=(1, 1), widths=(4, 8))
  return haq, plain, variables, calibration, (images[32:], labels[32:])


def _top1(model, variables, data, policy):
  logits = model.apply(variables, data[0], policy=policy)
  return float(jnp.mean(jnp.argmax(logits, -1) == data[1])) * 100, logits


def test_w8a8_equals_the_haqjax_resnet_s(twins, monkeypatch):
  """Same data, same options: the same folded and AdaRounded network.

  The two run the same arithmetic in another order (flax's convolutions and
  haqjax's), so values agree to float32 rounding (the tolerances leave room
  for it through AdaRound's optimisation); the top-1 on 32 images is then
  equal unless a logit pair sits within that of a tie.
  """
  monkeypatch.setattr(pointwise, "MATMUL_BACKENDS", ())  # 1x1 convs as XLA's
  haq, plain, variables, calibration, data = twins
  policy = Policy.uniform(layer_table(haq, SHAPE).names, 8, 8)
  options = PTQOptions(cle=False, adaround=True, adaround_iters=60,
                       weight_range="minmax", act_range="minmax")
  key = jax.random.key(0)
  want = ptq(key, haq, variables, calibration, policy, options)
  got = ptq(key, plain, strip_quantizers(variables), calibration, policy, options)
  # The BNs found by data flow are the ones the zoo's names pair.
  assert sorted(got.report["bn_pairs"]) == sorted(
      [p.name, "/".join(p.bn_path)] for p in folding.bn_pairs(variables))
  assert len(got.report["bn_pairs"]) == 6
  assert jax.tree.structure(got.variables) == jax.tree.structure(want.variables)
  for (path, a), (_, b) in zip(
      jax.tree_util.tree_leaves_with_path(got.variables["params"]),
      jax.tree_util.tree_leaves_with_path(want.variables["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  top1_want, logits_want = _top1(want.model, want.variables, data, policy)
  top1_got, logits_got = _top1(got.model, got.variables, data, policy)
  np.testing.assert_allclose(logits_got, logits_want, rtol=1e-4, atol=1e-4)
  assert top1_got == top1_want
  # The flow changed the network: W8A8 is not the float model's.
  _, fp32 = _top1(haq, variables, data, None)
  assert np.abs(np.asarray(logits_got) - np.asarray(fp32)).max() > 1e-4
  assert set(got.report["adaround_layer_seconds"]) == set(policy.names)
  assert got.report["adaround_skipped"] == []


def test_bias_correction_equals_the_haqjax_resnet_s(twins, monkeypatch):
  """Empirical bias correction: the same output errors, into the paired BNs."""
  monkeypatch.setattr(pointwise, "MATMUL_BACKENDS", ())
  haq, plain, variables, calibration, _ = twins
  policy = Policy.uniform(layer_table(haq, SHAPE).names, 3, 8)
  scheme = QuantScheme(weight=MinMaxWeight(), act=StaticRange())
  haq, plain = haq.clone(quant_scheme=scheme), quantized(plain, scheme)
  variables = init_quantizers(plain, strip_quantizers(variables), calibration[0]["image"])
  pairs = folding.traced_bn_pairs(plain, variables, SHAPE)
  folded = folding.fold_batch_norms(haq, variables)
  want = bias_correction.expected_output_error(haq, folded, calibration, policy)
  got = bias_correction.expected_output_error(plain, folded, calibration, policy)
  assert set(got) == set(want) == set(policy.names)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
  assert max(float(jnp.abs(e).max()) for e in want.values()) > 1e-3  # W3 shifts outputs
  by_name = bias_correction.correct_bias(folded, want)
  by_pairs = bias_correction.correct_bias(folded, want, pairs=pairs)
  for a, b in zip(jax.tree.leaves(by_pairs), jax.tree.leaves(by_name)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(by_pairs["params"]["stem_bn"]["bias"],
                            folded["params"]["stem_bn"]["bias"])


class TinyAttention(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=3, padding="VALID", name="embed")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attention")(x, x)
    return nn.Dense(3, name="head")(x.mean(axis=1))


def test_attention_matmuls_are_calibrated_only():
  model = TinyAttention()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6, 6, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x[:1])
  # AdaRound and bias correction take the nn.Conv and nn.Dense ops only.
  assert list(wrapped.layer_geometries(quantized(model), variables, x)) == ["embed", "head"]
  policy = Policy.uniform(("embed", "attention/query", "attention/key", "attention/value",
                           "attention/qk", "attention/pv", "attention/out", "head"), 8, 8)
  # CLE is on by default: no pair passes the attention's residual add.
  result = ptq(jax.random.key(1), model, variables, [x], policy,
               PTQOptions(adaround=False, bias_correction="empirical"))
  assert result.report["bn_pairs"] == []
  assert result.report["eq_pairs"] == [] and result.report["cle_passes"] == 1
  params = result.variables["params"]
  assert not np.allclose(params["head"]["bias"], variables["params"]["head"]["bias"])
  np.testing.assert_array_equal(params["attention"]["out"]["bias"],
                                variables["params"]["attention"]["out"]["bias"])
  qk = params["attention"]["qk"]
  assert set(qk) == {"act_quant", "rhs_quant"}
  assert np.all(qk["rhs_quant"]["hi"] > qk["rhs_quant"]["lo"])  # calibrated
