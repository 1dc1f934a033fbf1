"""Layer tables of quantized plain-flax models against the haqjax layers'."""

import flax.linen as nn
import jax.numpy as jnp
import pytest

from haqjax.nn import QConv
from haqjax.nn import QDense
from haqjax.nn import layer_table
from haqjax.nn import quantized

SHAPE = (3, 16, 16, 3)


class HaqNet(nn.Module):

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    x = QConv(8, (3, 3), strides=2, use_bias=True, name="stem")(x, policy)
    x = QConv(8, (3, 3), feature_group_count=8, name="block/dw")(x, policy)
    x = QConv(16, (1, 1), feature_group_count=2, name="block/grouped")(x, policy)
    x = QConv(16, (5, 5), strides=2, padding="VALID", name="valid")(x, policy)
    return QDense(10, name="fc")(jnp.mean(x, (1, 2)), policy)


class Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False, name="dw")(x)
    return nn.Conv(16, (1, 1), feature_group_count=2, use_bias=False, name="grouped")(x)


class FlaxNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), strides=2, name="stem")(x)
    x = Block(name="block")(x)
    x = nn.Conv(16, (5, 5), strides=(2, 2), padding="VALID", use_bias=False, name="valid")(x)
    return nn.Dense(10, name="fc")(jnp.mean(x, (1, 2)))


def test_convolutions_equal_the_haqjax_layers():
  want, got = layer_table(HaqNet(), SHAPE), layer_table(quantized(FlaxNet()), SHAPE)
  assert got.kinds == ("conv", "depthwise", "conv", "conv", "dense")
  assert got.rows() == want.rows()
  assert got.rows()[3]["out_h"] == 2 and got.rows()[2]["groups"] == 2


def test_dense_general_and_einsum_rows():
  class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((2, 4), name="split")(x)  # [B, T, 2, 4]
      y = nn.DenseGeneral(5, axis=(-2, -1), name="merge")(h)  # [B, T, 5]
      return nn.Einsum((5, 3), "btd,df->btf", name="einsum")(y)

  rows = {r["name"]: r for r in layer_table(quantized(Heads()), (1, 7, 6)).rows()}
  assert [rows[n]["kind"] for n in rows] == ["dense"] * 3
  assert [(rows[n]["in_channels"], rows[n]["out_channels"]) for n in rows] == [
      (6, 8), (8, 5), (5, 3)]
  assert [rows[n]["params"] for n in rows] == [6 * 8 + 8, 8 * 5 + 5, 5 * 3 + 3]
  assert [rows[n]["macs"] for n in rows] == [7 * 48, 7 * 40, 7 * 15]
  assert all(rows[n]["in_h"] == 7 for n in rows)


def test_a_layer_called_twice_is_an_error():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      shared = nn.Dense(4, name="shared")
      return shared(shared(x))

  with pytest.raises(ValueError, match="'shared' is called more than once"):
    layer_table(quantized(Twice()), (1, 4))


def test_nothing_to_quantize_is_an_error():
  class Norm(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm()(x)

  with pytest.raises(ValueError, match="Norm has no op to quantize"):
    layer_table(quantized(Norm()), (1, 4))
  with pytest.raises(ValueError, match="allowed: a flax.linen Module"):
    quantized(quantized(Norm()))
