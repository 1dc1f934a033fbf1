"""Tests of the layer table derived by tracing a model."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.nn import QConv
from haqjax.nn import QDense
from haqjax.nn import layer_table


class Net(nn.Module):

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    x = QConv(16, (3, 3), strides=2, name="stem")(x, policy)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = QConv(16, (3, 3), feature_group_count=16, name="block/dw")(x, policy)
    x = QConv(32, (1, 1), use_bias=True, name="block/pw")(x, policy)
    return QDense(10, name="fc")(jnp.mean(x, (1, 2)), policy)


def test_table_columns():
  t = layer_table(Net(), (8, 32, 32, 3))
  assert t.names == ("stem", "block/dw", "block/pw", "fc")
  assert t.kinds == ("conv", "depthwise", "conv", "dense")
  np.testing.assert_array_equal(t.in_channels, [3, 16, 16, 32])
  np.testing.assert_array_equal(t.out_channels, [16, 16, 32, 10])
  np.testing.assert_array_equal(t.stride, [2, 1, 1, 1])
  np.testing.assert_array_equal(t.groups, [1, 16, 1, 1])
  np.testing.assert_array_equal(t.in_h, [32, 16, 16, 1])
  np.testing.assert_array_equal(t.out_h, [16, 16, 16, 1])
  # MACs per example: out map * kernel elements.
  np.testing.assert_array_equal(
      t.macs, [16 * 16 * 27 * 16, 16 * 16 * 9 * 16, 16 * 16 * 16 * 32, 32 * 10])
  np.testing.assert_array_equal(t.params, [27 * 16, 9 * 16, 16 * 32 + 32, 32 * 10 + 10])
  np.testing.assert_array_equal(t.weight_count, [27 * 16, 9 * 16, 16 * 32, 320])
  np.testing.assert_array_equal(t.is_depthwise, [False, True, False, False])
  rows = t.rows()
  assert rows[1]["kind"] == "depthwise" and rows[1]["kernel_h"] == 3
  assert "4 layers" in t.format()


def test_table_counts_match_initialised_params():
  import jax  # pylint: disable=g-import-not-at-top
  model = Net()
  t = layer_table(model, (1, 32, 32, 3))
  v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  counted = sum(int(np.prod(p.shape)) for name, layer in v["params"].items()
                if name != "BatchNorm_0" for p in jax.tree.leaves(layer))
  assert counted == int(t.params.sum())


def test_no_layer_is_an_error():
  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, policy=None, train=False):
      return nn.Dense(3)(x)

  with pytest.raises(ValueError, match="has no haqjax layer"):
    layer_table(Plain(), (1, 4))


def test_shared_layer_is_an_error():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x, policy=None, train=False):
      layer = QDense(4, name="shared")
      return layer(layer(x, policy), policy)

  with pytest.raises(ValueError, match="'shared' is called more than once"):
    layer_table(Shared(), (1, 4))
