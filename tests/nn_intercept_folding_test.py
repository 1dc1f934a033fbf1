"""Conv -> BN pairs of a plain flax model from its traced computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.nn import conv_bn_pairs
from haqjax.nn import quantized
from haqjax.ptq import folding
from nn_intercept_testing import random_variables

SHAPE = (2, 8, 8, 3)


class Net(nn.Module):
  """Names that follow no convention; BNs after a conv, a ReLU and a sum."""

  @nn.compact
  def __call__(self, x, train=False):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    x = norm("first")(nn.Conv(4, (3, 3), name="c")(x))  # Paired (the conv has a bias).
    y = norm("after_relu")(nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="d")(x)))
    z = nn.Conv(4, (1, 1), use_bias=False, name="e")(y)
    s = norm("after_sum")(z + x)  # Not paired: its input is a sum.
    h = nn.Dense(5, use_bias=False, name="proj")(jnp.mean(s, axis=(1, 2)))
    return norm("head_norm")(h)  # Paired: a dense layer's output.


@pytest.fixture(scope="module")
def setup():
  model = quantized(Net())
  x = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)
  return model, random_variables(model, x), x


def test_pairs_by_data_flow(setup):
  model, variables, _ = setup
  pairs = conv_bn_pairs(model, variables, SHAPE)
  assert [(p.path, p.bn_path) for p in pairs] == [
      (("c",), ("first",)), (("proj",), ("head_norm",))]
  assert folding.bn_pairs(variables) == ()  # The naming convention finds none.


def test_folding_the_traced_pairs_keeps_the_outputs(setup):
  model, variables, x = setup
  pairs = folding.traced_bn_pairs(model, variables, SHAPE)
  assert [p.name for p in pairs] == ["c", "proj"]
  folded = folding.fold_batch_norms(model, variables, pairs=pairs)
  assert folding.is_folded(folded, pairs[0]) and folding.is_folded(folded, pairs[1])
  forward = jax.jit(lambda v: model.apply(v, x))
  np.testing.assert_allclose(forward(folded), forward(variables), rtol=1e-4, atol=1e-5)
  assert not np.allclose(folded["params"]["c"]["kernel"], variables["params"]["c"]["kernel"])
  stats = folding.bn_output_stats(variables, pairs=pairs)
  np.testing.assert_array_equal(stats["c"][0], variables["params"]["first"]["bias"])


def test_another_epsilon_is_named():
  class Eps(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(
          nn.Conv(2, (1, 1), name="conv")(x))

  model = quantized(Eps())
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones(SHAPE))
  with pytest.raises(ValueError, match="'bn' has epsilon 0.001"):
    folding.traced_bn_pairs(model, variables, SHAPE)
