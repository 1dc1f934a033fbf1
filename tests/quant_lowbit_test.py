"""Tests of the binary (XNOR-Net) and ternary (TWN) weights against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.quant.lowbit import BinaryWeight
from haqjax.quant.lowbit import TernaryWeight
from haqjax.quant.lowbit import binarize
from haqjax.quant.lowbit import ternarize


def _axes(ndim, channel_axis):
  if channel_axis is None:
    return None
  return tuple(a for a in range(ndim) if a != channel_axis % ndim)


def _np_binary(w, channel_axis):
  alpha = np.mean(np.abs(w), axis=_axes(w.ndim, channel_axis), keepdims=True)
  return np.where(w >= 0, 1.0, -1.0) * alpha


def _np_ternary(w, channel_axis, t=0.7):
  axes = _axes(w.ndim, channel_axis)
  delta = t * np.mean(np.abs(w), axis=axes, keepdims=True)
  keep = np.abs(w) > delta
  alpha = (np.sum(np.abs(w) * keep, axis=axes, keepdims=True)
           / np.maximum(np.sum(keep, axis=axes, keepdims=True), 1))
  return np.sign(w) * keep * alpha


def _kernel(seed=0, shape=(3, 3, 8, 6)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("channel_axis", [-1, 0, None])
@pytest.mark.parametrize("shape", [(3, 3, 8, 6), (16, 10)])
def test_match_numpy(channel_axis, shape):
  w = _kernel(1, shape)
  np.testing.assert_allclose(binarize(w, channel_axis), _np_binary(w, channel_axis),
                             rtol=1e-6)
  np.testing.assert_allclose(ternarize(w, channel_axis), _np_ternary(w, channel_axis),
                             rtol=1e-6)
  levels = np.moveaxis(np.asarray(ternarize(w, channel_axis)), channel_axis or 0, 0)
  for row in levels.reshape(levels.shape[0], -1) if channel_axis is not None else [levels]:
    assert len(np.unique(row)) <= 3


def test_hand_computed():
  w = jnp.array([[0.1, -2.0], [-0.3, 0.0], [1.0, 4.0]])
  # Column 0: mean|w| = 0.4667, sign(-0.3) = -1. Column 1: mean 2, sign(0) = +1.
  np.testing.assert_allclose(binarize(w), [[1.4 / 3, -2.0], [-1.4 / 3, 2.0],
                                           [1.4 / 3, 2.0]], rtol=1e-6)
  # Column 0: delta = 0.7 * 0.4667 = 0.3267, keeps 1.0 only: alpha 1.
  # Column 1: delta = 1.4, keeps -2 and 4: alpha 3.
  np.testing.assert_allclose(ternarize(w), [[0.0, -3.0], [0.0, 0.0], [1.0, 3.0]],
                             rtol=1e-6)


@pytest.mark.parametrize("quantizer", [BinaryWeight(), TernaryWeight()])
def test_all_zero_channels(quantizer):
  w = jnp.asarray(_kernel()).at[..., 2].set(0.0)
  out = quantizer({}, w, 1)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[..., 2], 0.0)
  np.testing.assert_array_equal(quantizer({}, jnp.zeros((4, 3)), 2), 0.0)
  g = jax.grad(lambda w: jnp.sum(quantizer({}, w, 1)))(jnp.zeros((4, 3)))
  np.testing.assert_array_equal(g, 1.0)


@pytest.mark.parametrize("cls", [BinaryWeight, TernaryWeight])
@pytest.mark.parametrize("clip_grad", [False, True])
def test_gradient_masks(cls, clip_grad):
  w = jnp.asarray(_kernel(2)) * 1.5
  upstream = jnp.asarray(_kernel(3))
  g = jax.grad(lambda w: jnp.sum(cls(clip_grad=clip_grad)({}, w, 1) * upstream))(w)
  want = upstream * (np.abs(w) <= 1) if clip_grad else upstream
  np.testing.assert_array_equal(g, want)
  if clip_grad:
    assert 0 < np.mean(np.abs(w) > 1) < 1  # Both branches are exercised.


@pytest.mark.parametrize("cls", [BinaryWeight, TernaryWeight])
def test_bits_ignored_except_float(cls):
  w = jnp.asarray(_kernel(4))
  q = cls()
  f = jax.jit(q.__call__)
  out = [f({}, w, jnp.int32(b)) for b in range(1, 9)]
  for o in out:
    np.testing.assert_array_equal(o, q({}, w, 1))  # jit agrees with eager.
  np.testing.assert_array_equal(f({}, w, jnp.int32(32)), w)
  np.testing.assert_array_equal(jax.vmap(lambda b: q({}, w, b))(jnp.array([2, 32]))[1], w)


@pytest.mark.parametrize("kwargs, message", [
    ({"channel_axis": 1.5}, "channel_axis is 1.5"),
    ({"clip_grad": "yes"}, "clip_grad is 'yes'"),
])
def test_config_validation(kwargs, message):
  for cls in (BinaryWeight, TernaryWeight):
    with pytest.raises(ValueError, match=message):
      cls(**kwargs)
  with pytest.raises(ValueError, match="threshold is 0"):
    TernaryWeight(threshold=0)
