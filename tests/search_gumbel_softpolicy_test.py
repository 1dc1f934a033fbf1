"""SoftPolicy: one-hot equals the Policy path; a mixture costs one conv per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax import quant
from haqjax.nn import layer_table
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy
from haqjax.policy import SoftPolicy

BITS = (2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="module")
def quickstart():
  model = models.create("quickstart_cnn", num_classes=10)
  x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  variables = model.init(jax.random.key(1), x)
  names = layer_table(model, x.shape).names
  return model, variables, x, names


def _random_policy(names, seed):
  rng = np.random.default_rng(seed)
  w = rng.choice(BITS, len(names))
  a = rng.choice(BITS, len(names))
  return Policy.create(names, w, a)


@pytest.mark.parametrize("train", [False, True])
def test_one_hot_soft_policy_equals_policy(quickstart, train):
  model, variables, x, names = quickstart
  policy = _random_policy(names, 0)
  soft = SoftPolicy.from_policy(policy, BITS)
  np.testing.assert_array_equal(np.asarray(soft.w_probs).sum(-1), 1.0)

  def apply(p):
    out = model.apply(variables, x, policy=p, train=train, mutable=["batch_stats"])
    return out[0]

  np.testing.assert_allclose(apply(soft), apply(policy), rtol=1e-5, atol=1e-5)


def test_float_and_fixed_rows(quickstart):
  """A layer outside the candidates (float input, HAQ's first layer) is its own row."""
  model, variables, x, names = quickstart
  policy = quant.haq_convention(_random_policy(names, 1), first=True, last=True)
  soft = SoftPolicy.from_policy(policy, BITS)
  assert np.all(np.asarray(soft.a_bits)[0] == FLOAT_BITS)
  np.testing.assert_allclose(model.apply(variables, x, policy=soft),
                             model.apply(variables, x, policy=policy), rtol=1e-5, atol=1e-5)


def test_mixture_is_linear_in_the_quantized_kernel():
  """With float inputs, a dense layer of the mixture is the mixture of the outputs."""
  model = models.create("digits_cnn", num_classes=10)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  names = layer_table(model, x.shape).names
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(2), (len(names), len(BITS))))
  a_float = np.full((len(names), len(BITS)), FLOAT_BITS)
  one_hot = np.eye(len(BITS))[np.zeros(len(names), int)]
  # Only the classifier's weights are mixed; everything else is float.
  w_bits = np.where(np.arange(len(names))[:, None] == len(names) - 1, BITS, FLOAT_BITS)
  w_probs = np.where(np.arange(len(names))[:, None] == len(names) - 1, probs, one_hot)
  soft = SoftPolicy.create(names, w_probs, one_hot, w_bits, a_float)
  mixed = model.apply(variables, x, policy=soft)
  parts = []
  for k, b in enumerate(BITS):
    w = np.full(len(names), FLOAT_BITS)
    w[-1] = b
    parts.append(model.apply(variables, x, policy=Policy.create(names, w, FLOAT_BITS)))
  bias = variables["params"]["classifier"]["bias"]
  expected = sum(probs[-1, k] * (p - bias) for k, p in enumerate(parts)) + bias
  np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold_bn", [False, True])
def test_one_conv_per_layer(fold_bn):
  model = models.create("quickstart_cnn", num_classes=10, fold_bn=fold_bn)
  x = jnp.zeros((2, 28, 28, 1))
  variables = model.init(jax.random.key(1), x)
  names = layer_table(model, x.shape).names
  k = len(BITS)
  probs = jnp.full((len(names), k), 1.0 / k)
  soft = SoftPolicy.create(names, probs, probs, BITS)
  convs = [r for r in layer_table(model, x.shape).rows() if r["kind"] != "dense"]
  assert len(convs) == 6
  # On CPU a 1x1 layer is a matrix product (`haqjax.nn.pointwise`) and a
  # depthwise one shifted multiply-adds (`haqjax.nn.depthwise`).
  on_cpu = jax.default_backend() == "cpu"
  matmuls = sum(on_cpu and (r["kernel_h"], r["kernel_w"]) == (1, 1) and r["groups"] == 1
                for r in convs)
  taps = sum(on_cpu and r["groups"] == r["in_channels"] > 1 for r in convs)
  text = str(jax.make_jaxpr(lambda v, s: model.apply(v, x, policy=s))(variables, soft))
  one = str(jax.make_jaxpr(lambda v, p: model.apply(v, x, policy=p))(
      variables, Policy.uniform(names, 4, 4)))
  for jaxpr in (text, one):
    assert jaxpr.count("conv_general_dilated[") == len(convs) - matmuls - taps
    # The 1x1 layers' products and the classifier's: one each.
    assert jaxpr.count("dot_general[") == matmuls + 1


def test_bad_shapes():
  with pytest.raises(ValueError, match=r"w_probs has shape \(2, 3\); allowed: \(2, 2\)"):
    SoftPolicy.create(("a", "b"), np.ones((2, 3)), np.ones((2, 2)), (2, 4))
  with pytest.raises(ValueError, match="w_bits of layer 0"):
    SoftPolicy.create(("a", "b"), np.ones((2, 2)), np.ones((2, 2)), (0, 4))
