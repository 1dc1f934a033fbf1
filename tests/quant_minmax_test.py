"""Tests of the min-max STE fake quantizers against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.quant import MinMaxActivation
from haqjax.quant import MinMaxWeight
from haqjax.quant import symmetric_fake_quant
from haqjax.quant import unsigned_fake_quant


def _np_symmetric(x, bits, axes):
  absmax = np.max(np.abs(x), axis=axes, keepdims=True)
  if bits == 1:
    return np.where(x >= 0, 1.0, -1.0) * np.mean(np.abs(x), axis=axes, keepdims=True)
  qmax = 2.0 ** (bits - 1) - 1
  scale = np.where(absmax > 0, absmax / qmax, 1.0)
  return np.clip(np.round(x / scale), -qmax, qmax) * scale


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("channel_axis", [None, -1, 0])
def test_symmetric_matches_numpy(bits, channel_axis):
  x = np.random.default_rng(bits).normal(size=(3, 3, 4, 5)).astype(np.float32)
  axes = None if channel_axis is None else tuple(
      a for a in range(4) if a != channel_axis % 4)
  got = symmetric_fake_quant(jnp.asarray(x), bits, channel_axis)
  np.testing.assert_allclose(got, _np_symmetric(x, bits, axes), rtol=1e-6, atol=1e-6)
  # At most 2^b distinct levels per channel (2 for binary).
  flat = np.moveaxis(np.asarray(got), channel_axis or 0, 0).reshape(x.shape[channel_axis or 0], -1)
  for row in flat if channel_axis is not None else [np.asarray(got).ravel()]:
    assert len(np.unique(row)) <= max(2 ** bits - 1, 2)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unsigned_matches_numpy(bits):
  x = np.abs(np.random.default_rng(0).normal(size=(64,))).astype(np.float32)
  qmax = 2.0 ** bits - 1
  scale = x.max() / qmax
  want = np.clip(np.round(x / scale), 0, qmax) * scale
  np.testing.assert_allclose(unsigned_fake_quant(jnp.asarray(x), bits), want, rtol=1e-6)
  assert len(np.unique(np.asarray(unsigned_fake_quant(jnp.asarray(x), bits)))) <= 2 ** bits


def test_float_bits_pass_through_and_zero_tensor():
  x = jnp.linspace(-1, 1, 11)
  np.testing.assert_array_equal(symmetric_fake_quant(x, 32), x)
  np.testing.assert_array_equal(unsigned_fake_quant(jnp.abs(x), 32), jnp.abs(x))
  zeros = jnp.zeros((4, 3))
  np.testing.assert_array_equal(symmetric_fake_quant(zeros, 4, -1), zeros)
  np.testing.assert_array_equal(unsigned_fake_quant(zeros, 4), zeros)


def test_straight_through_gradient():
  x = jax.random.normal(jax.random.key(0), (16, 8))
  g = jax.grad(lambda x: jnp.sum(MinMaxWeight()({}, x, 3) * 2.0))(x)
  np.testing.assert_allclose(g, 2.0)
  g = jax.grad(lambda x: jnp.sum(MinMaxActivation()({}, x, 3)))(jnp.abs(x))
  np.testing.assert_allclose(g, 1.0)


def test_activation_sign_chooses_range():
  relu = jnp.array([0.0, 0.5, 1.0, 3.0])
  q = MinMaxActivation()({}, relu, 2)  # Unsigned: 4 levels on [0, 3].
  np.testing.assert_allclose(q, [0.0, 0.0, 1.0, 3.0])
  signed = jnp.array([-3.0, -1.0, 0.4, 3.0])
  q = MinMaxActivation()({}, signed, 2)  # Signed symmetric: {-3, 0, 3}.
  np.testing.assert_allclose(q, [-3.0, 0.0, 0.0, 3.0])


def test_traced_bits_compile_once():
  traces = []

  @jax.jit
  def f(x, bits):
    traces.append(1)
    return symmetric_fake_quant(x, bits, -1)

  x = jnp.ones((3, 4))
  for b in range(1, 9):
    f(x, jnp.int32(b))
  assert len(traces) == 1
