"""Tests of the FP8 fake-cast against an ml_dtypes (numpy) reference."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from haqjax.quant.fp8 import FP8
from haqjax.quant.fp8 import FP8_MAX
from haqjax.quant.fp8 import fp8_fake_cast

NP_FORMATS = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def _np_fake_cast(x, fmt, channel_axis):
  axes = None if channel_axis is None else tuple(
      a for a in range(x.ndim) if a != channel_axis % x.ndim)
  a = np.abs(x)
  amax = np.max(np.where(np.isfinite(a), a, 0), axis=axes, keepdims=True)
  fmax = np.float32(FP8_MAX[fmt])
  scale = np.where(amax > 0, amax * (np.float32(1) / fmax), 1).astype(np.float32)
  inv = np.where(amax > 0, fmax / np.where(amax > 0, amax, 1), 1).astype(np.float32)
  y = np.clip(x * inv, -fmax, fmax).astype(NP_FORMATS[fmt]).astype(np.float32)
  return y * scale


def _data(seed=0, shape=(3, 3, 8, 6)):
  rng = np.random.default_rng(seed)  # Magnitudes over ~10 decades.
  return (rng.choice([-1, 1], size=shape) * np.exp(rng.normal(0, 4, size=shape))
          ).astype(np.float32)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("channel_axis", [None, -1, 0])
def test_matches_ml_dtypes(fmt, channel_axis):
  x = _data()
  got = fp8_fake_cast(x, fmt, channel_axis)
  np.testing.assert_array_equal(got, _np_fake_cast(x, fmt, channel_axis))
  np.testing.assert_array_equal(jax.jit(fp8_fake_cast, static_argnums=(1, 2))(
      x, fmt, channel_axis), got)
  # Relative error of normal values: at most half an ulp (2^-4 or 2^-3).
  big = np.abs(x) > 1e-2 * np.max(np.abs(x), axis=None if channel_axis is None else
                                  tuple(a for a in range(4) if a != channel_axis % 4),
                                  keepdims=True)
  rel = np.abs(np.asarray(got) - x)[big] / np.abs(x)[big]
  assert rel.max() <= {"e4m3": 2.0 ** -4, "e5m2": 2.0 ** -3}[fmt] * (1 + 1e-6)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_amax_is_kept_and_zeros(fmt):
  x = jnp.array([[-3.0, 0.0], [1.0, 0.0], [0.001, 0.0]])
  got = fp8_fake_cast(x, fmt, channel_axis=-1)
  np.testing.assert_allclose(got[0, 0], -3.0, rtol=1e-6)  # Top of the format.
  np.testing.assert_array_equal(got[:, 1], 0.0)  # All-zero channel.
  np.testing.assert_array_equal(fp8_fake_cast(jnp.zeros((4, 4)), fmt), 0.0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_nan_and_inf(fmt):
  x = jnp.array([1.0, -2.0, jnp.nan, jnp.inf, -jnp.inf, 0.5])
  got = np.asarray(FP8(fmt=fmt)({}, x, 8))
  assert np.isnan(got[2]) and np.isfinite(np.delete(got, 2)).all()  # No spreading.
  np.testing.assert_allclose(got[3:5], [2.0, -2.0], rtol=1e-6)  # Saturate at amax.
  finite = np.array([1.0, -2.0, 0.5], np.float32)
  np.testing.assert_array_equal(got[[0, 1, 5]], _np_fake_cast(finite, fmt, None))
  g = jax.grad(lambda x: jnp.nansum(FP8(fmt=fmt)({}, x, 8)))(x)
  np.testing.assert_array_equal(g, [1.0, 1.0, 0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_quantizer_ste_bits_and_jit(fmt):
  x = jnp.asarray(_data(1))
  q = FP8(fmt=fmt, channel_axis=-1)
  f = jax.jit(q.__call__)
  want = fp8_fake_cast(x, fmt, -1)
  for b in range(1, 9):  # bits ignored.
    np.testing.assert_array_equal(f({}, x, jnp.int32(b)), want)
  np.testing.assert_array_equal(f({}, x, jnp.int32(32)), x)
  np.testing.assert_array_equal(jax.vmap(lambda b: q({}, x, b))(jnp.array([4, 32]))[0], want)
  g = jax.grad(lambda x: jnp.sum(q({}, x, 8) * 3.0))(x)
  np.testing.assert_array_equal(g, 3.0)


def test_keeps_dtype():
  x = jnp.asarray(_data(2), jnp.bfloat16)
  out = FP8(fmt="e4m3")({}, x, 8)
  assert out.dtype == jnp.bfloat16


def test_config_validation():
  with pytest.raises(ValueError, match="fmt is 'e3m4'"):
    FP8(fmt="e3m4")
  with pytest.raises(ValueError, match="channel_axis is 'out'"):
    FP8(channel_axis="out")
  with pytest.raises(ValueError, match="fmt is 'int8'"):
    fp8_fake_cast(jnp.ones(3), "int8")
