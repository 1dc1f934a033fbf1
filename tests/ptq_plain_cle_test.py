"""Cross-layer equalization and analytic bias correction on plain flax models.

The pairs come from the traced computation (`haqjax.nn.dataflow.layer_chains`,
`haqjax.ptq.wrapped.equalization_pairs`); a plain ResNet with the zoo's
module names must then be equalized as its haqjax-layer twin is.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.nn import layer_table
from haqjax.nn import pointwise
from haqjax.nn import quantized
from haqjax.nn.dataflow import LayerChain
from haqjax.nn.dataflow import layer_chains
from haqjax.policy import Policy
from haqjax.ptq import PTQOptions
from haqjax.ptq import equalization
from haqjax.ptq import folding
from haqjax.ptq import wrapped
from haqjax.ptq.pipeline import prepare
from haqjax.ptq.pipeline import quantize
from nn_intercept_resnet_test import ResNet
from nn_intercept_testing import random_variables
from nn_intercept_testing import strip_quantizers

SHAPE = (8, 8, 8, 3)


OPTIONS = PTQOptions(adaround=False, weight_range="minmax", act_range="minmax")


@pytest.fixture(scope="module")
def twins():
  """(haqjax ResNet, its variables, its `prepare`d flow, the plain twin's)."""
  haq = models.CifarResNet(stage_sizes=(1, 1), widths=(4, 8))
  images = jnp.asarray(np.random.default_rng(3).normal(size=(16, *SHAPE[1:])), jnp.float32)
  variables = random_variables(haq, images[:1])
  plain = ResNet(stage_sizes=(1, 1), widths=(4, 8))
  batches = [images[:8], images[8:]]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pointwise, "MATMUL_BACKENDS", ())  # 1x1 convs as XLA's
    want = prepare(haq, variables, batches, OPTIONS)
    got = prepare(plain, strip_quantizers(variables), batches, OPTIONS)
  return haq, variables, want, got


def _params(prepared):
  return strip_quantizers(prepared.variables["params"])


def _assert_close(got, want, tol):
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got),
                               jax.tree_util.tree_leaves_with_path(want)):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol / 10,
                               err_msg=jax.tree_util.keystr(path))


def test_cle_equals_the_haqjax_resnet_s(twins):
  """The traced pairs are the zoo's, and both nets are equalized alike."""
  haq, variables, want, got = twins
  assert got.pairs == want.pairs == equalization.equalization_pairs(haq)
  assert got.report["eq_pairs"] == [["layer1_0/conv1", "layer1_0/conv2", "relu"],
                                    ["layer2_0/conv1", "layer2_0/conv2", "relu"]]
  assert jax.tree.structure(_params(got)) == jax.tree.structure(_params(want))
  _assert_close(_params(got), _params(want), 1e-5)
  # Equalization moved the paired kernels away from the only-folded ones.
  folded = folding.fold_batch_norms(haq, variables)["params"]
  for name in ("conv1", "conv2"):
    a = _params(got)["layer1_0"][name]["kernel"]
    assert np.abs(np.asarray(a) - folded["layer1_0"][name]["kernel"]).max() > 1e-3
  np.testing.assert_allclose(_params(got)["stem"]["kernel"], folded["stem"]["kernel"],
                             rtol=1e-6)


def test_analytic_bias_correction_equals_the_haqjax_resnet_s(twins, monkeypatch):
  monkeypatch.setattr(pointwise, "MATMUL_BACKENDS", ())
  haq, _, want, got = twins
  policy = Policy.uniform(layer_table(haq, SHAPE).names, 3, 8)
  analytic = dataclasses.replace(OPTIONS, bias_correction="analytic")
  key = jax.random.key(0)
  want = quantize(key, want, policy, analytic).variables["params"]
  nearest = quantize(key, got, policy, dataclasses.replace(
      OPTIONS, bias_correction="none")).variables["params"]
  got = quantize(key, got, policy, analytic).variables["params"]
  bias = lambda p: np.asarray(p["layer1_0"]["conv2_bn"]["bias"])
  assert np.abs(bias(got) - bias(nearest)).max() > 1e-4  # W3 shifts the outputs
  np.testing.assert_array_equal(got["stem_bn"]["bias"], nearest["stem_bn"]["bias"])
  _assert_close(got, want, 1e-4)


class Mixed(nn.Module):
  """Pairs CLE can take, and paths it cannot pass."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda name: nn.BatchNorm(use_running_average=True, name=name)
    x = nn.relu(bn("a_bn")(nn.Conv(4, (3, 3), use_bias=False, name="a")(x)))
    x = nn.relu6(bn("dw_bn")(nn.Conv(4, (3, 3), feature_group_count=4, use_bias=False,
                                     name="dw")(x)))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.gelu(nn.Conv(6, (1, 1), name="b")(x))  # gelu: not homogeneous
    y = nn.relu(nn.Conv(6, (1, 1), name="c")(x))
    x = x + nn.Conv(6, (1, 1), name="d")(y)  # c -> d; d's output meets an add
    x = nn.Conv(6, (1, 1), name="e")(x)
    x = nn.Conv(6, (1, 1), feature_group_count=2, name="grouped")(x)
    return nn.Dense(3, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def test_chains_stop_where_scaling_does_not_commute():
  model = Mixed()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x[:1])
  chains = layer_chains(quantized(model), variables, x.shape)
  assert chains == (LayerChain(("a",), ("dw",), "relu"), LayerChain(("dw",), ("b",), "relu6"),
                    LayerChain(("c",), ("d",), "relu"),
                    LayerChain(("e",), ("grouped",), "linear"),
                    LayerChain(("grouped",), ("head",), "relu"))
  bn_pairs = folding.traced_bn_pairs(quantized(model), variables, x.shape)
  pairs = wrapped.equalization_pairs(quantized(model), variables, x.shape, bn_pairs)
  # The grouped conv cannot take per-input-channel scales from `e`.
  assert [tuple(p) for p in pairs] == [("a", "dw", "relu"), ("dw", "b", "relu6"),
                                       ("c", "d", "relu"), ("grouped", "head", "relu")]
  folded = folding.fold_batch_norms(model, variables, pairs=bn_pairs)
  eq = equalization.cross_layer_equalization(folded, pairs, bn_pairs=bn_pairs)
  params, before = eq.variables["params"], folded["params"]
  for name in ("a", "c", "d", "grouped", "head"):
    assert np.abs(np.asarray(params[name]["kernel"]) - before[name]["kernel"]).max() > 1e-3
  for name in ("b", "e"):  # ReLU6 pairs are skipped; `e` pairs with nothing.
    np.testing.assert_array_equal(params[name]["kernel"], before[name]["kernel"])
  # Scaling commutes with every path taken: the float function stays.
  np.testing.assert_allclose(model.apply(eq.variables, x), model.apply(variables, x),
                             rtol=1e-4, atol=1e-5)


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    conv = nn.Conv(4, (1, 1), name="shared")
    y = nn.Conv(4, (1, 1), name="after")(nn.relu(conv(x)))  # alone, a pair
    return nn.Conv(4, (1, 1), name="last")(nn.relu(conv(y))) + y


def test_a_layer_run_twice_pairs_with_nothing():
  model = Shared()
  variables = model.init(jax.random.key(0), jnp.ones((1, 4, 4, 4)))
  assert layer_chains(quantized(model), variables, (2, 4, 4, 4)) == ()
