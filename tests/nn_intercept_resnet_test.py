"""A ResNet written with plain flax layers, quantized by interception.

The model below is written as a user writes it (`nn.Conv`, `nn.BatchNorm`,
residual adds), with the module names of `haqjax.models.CifarResNet`, so
the wrapped model and the haqjax-layer network share their variables, their
layer table and, under one policy, their logits.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import layer_table
from haqjax.nn import pointwise
from haqjax.nn import quantized
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy
from haqjax.quant import MinMaxWeight
from haqjax.quant import QuantScheme
from haqjax.quant import StaticRange
from nn_intercept_testing import random_variables
from nn_intercept_testing import strip_quantizers

SCHEME = QuantScheme(weight=MinMaxWeight(), act=StaticRange())
SHAPE = (4, 8, 8, 3)


class Block(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train=False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False,
                name="conv1")(x)
    y = nn.relu(norm(name="conv1_bn")(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name="conv2")(y)
    y = norm(name="conv2_bn")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False,
                  name="downsample")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  stage_sizes: tuple = (1, 1, 1)
  widths: tuple = (8, 16, 32)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             name="stem_bn")(x))
    for s, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for b in range(n):
        x = Block(width, 2 if s > 0 and b == 0 else 1, name=f"layer{s + 1}_{b}")(x, train)
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def nets():
  """(haqjax ResNet, wrapped plain ResNet, the haqjax net's variables, images)."""
  haq = models.resnet_small(depth=8, width_mult=0.5).clone(quant_scheme=SCHEME)
  plain = quantized(ResNet(), SCHEME)
  images = jnp.asarray(np.random.default_rng(1).normal(size=SHAPE), jnp.float32)
  return haq, plain, random_variables(haq, images), images


@functools.partial(jax.jit, static_argnames="model")
def run(model, variables, images, policy):
  return model.apply(variables, images, policy=policy)


@pytest.fixture(autouse=True)
def xla_convolutions(monkeypatch):
  """The haqjax layers run 1x1 convolutions as XLA's, as flax's nn.Conv does."""
  monkeypatch.setattr(pointwise, "MATMUL_BACKENDS", ())


def test_table_equals_the_haqjax_network(nets):
  haq, plain, _, _ = nets
  want, got = layer_table(haq, SHAPE), layer_table(plain, SHAPE)
  assert got.names == want.names
  assert got.names[:4] == ("stem", "layer1_0/conv1", "layer1_0/conv2", "layer2_0/conv1")
  assert got.kinds == want.kinds
  for row_got, row_want in zip(got.rows(), want.rows()):
    assert row_got == row_want
  assert got.float_ops == ()


def test_resnet20_table_equals_the_haqjax_resnet20_s():
  shape = (1, 32, 32, 3)
  want = layer_table(models.resnet20(), shape)
  got = layer_table(quantized(ResNet((3, 3, 3), (16, 32, 64))), shape)
  assert len(got) == 22 and got.rows() == want.rows()
  assert int(got.params.sum()) == int(want.params.sum())


def test_variables_are_the_haqjax_network_s(nets):
  haq, plain, _, images = nets
  # The user's variables plus quantizer ranges where the haqjax layers keep theirs.
  want = jax.eval_shape(haq.init, jax.random.key(0), images)
  got = jax.eval_shape(plain.init, jax.random.key(0), images)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.map(lambda s: s.shape, got) == jax.tree.map(lambda s: s.shape, want)
  assert "act_quant" in got["params"]["layer2_0"]["downsample"]


def test_float_logits_equal_the_user_model_s(nets):
  _, plain, variables, images = nets
  user = strip_quantizers(variables)  # The user's own variables.
  np.testing.assert_array_equal(run(plain, variables, images, None),
                                jax.jit(plain.model.apply)(user, images))


@pytest.mark.parametrize("mixed", [False, True], ids=["w4a4", "mixed"])
def test_quantized_logits_equal_the_haqjax_network(nets, mixed):
  haq, plain, variables, images = nets
  names = layer_table(haq, SHAPE).names
  if mixed:
    rng = np.random.default_rng(0)
    w, a = rng.integers(2, 9, len(names)), rng.integers(2, 9, len(names))
    a[0] = FLOAT_BITS
    policy = Policy.create(names, w, a)
  else:
    policy = Policy.uniform(names, 4, 4)
  batches = [images[:2], images[2:]]
  want_vars = calibrate_lib.calibrate(haq, variables, batches, policy)
  got_vars = calibrate_lib.calibrate(plain, variables, batches, policy)
  ranges = lambda v: jax.tree.leaves(jax.tree.map(np.asarray, v["params"]))
  for got, want in zip(ranges(got_vars), ranges(want_vars)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  want = run(haq, want_vars, images, policy)
  got = run(plain, got_vars, images, policy)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Quantization changes the logits: the comparison is not of float models.
  assert np.abs(np.asarray(got) - np.asarray(run(plain, variables, images, None))).max() > 1e-3
