"""Tests of the calibration (range setting) functions against numpy references."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.quant import affine
from haqjax.quant import calibration
from haqjax.quant.affine import AffineSpec

SHAPE = (6, 8, 5)

# name -> (granularity kwargs of AffineSpec, numpy view of x, reduced axes).
GRANULARITIES = {
    "per_tensor": ({}, lambda x: x, (0, 1, 2)),
    "per_channel_last": ({"channel_axis": -1}, lambda x: x, (0, 1)),
    "per_channel_first": ({"channel_axis": 0}, lambda x: x, (1, 2)),
    "per_group": ({"channel_axis": -1, "group_size": 4, "group_axis": 1},
                  lambda x: x.reshape(6, 2, 4, 5), (0, 2)),
}
GRIDS = {
    "signed_symmetric": {"signed": True, "symmetric": True},
    "signed_asymmetric": {"signed": True, "symmetric": False},
    "unsigned": {"signed": False, "symmetric": False},
}


def _case(granularity, grid):
  kwargs, view, axes = GRANULARITIES[granularity]
  return AffineSpec(**kwargs, **GRIDS[grid]), view, axes


def _data(seed=0, shape=SHAPE, nonneg=False):
  x = np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32)
  return np.abs(x) if nonneg else x


@functools.partial(jax.jit, static_argnames=("spec", "method", "num_candidates",
                                             "num_bins", "chunk_size"))
def _calibrate(x, bits, spec, method, **options):
  return calibration.calibrate_range(x, bits, spec, method, **options)


# ----------------------------------------------------------------- references


def _np_fake_quant(x, bits, lo, hi, signed, symmetric):
  """Quantize-dequantize of a view `x` with kept-dims ranges (float32)."""
  f32 = np.float32
  lo, hi = lo.astype(f32), hi.astype(f32)
  if signed:
    qmin, qmax = f32(-2.0 ** (bits - 1)), f32(2.0 ** (bits - 1) - 1)
  else:
    qmin, qmax = f32(0), f32(2.0 ** bits - 1)
  if symmetric and signed:
    absmax = np.maximum(np.abs(lo), np.abs(hi))
    # max|x| / ((qmax - qmin) / 2) = max|x| / (2^(b-1) - 1/2); binary max|x|.
    # Widened by one part in 2^20, so that -max|x| rounds past the tie.
    levels = f32(1) if bits == 1 else (qmax - qmin) * f32(0.5 + 2.0 ** -21)
    scale = absmax * (f32(1) / levels)
    zp = np.zeros_like(scale)
  elif symmetric:
    absmax = np.maximum(hi, f32(0))
    scale = absmax * (f32(1) / max(qmax, f32(1)))
    zp = np.zeros_like(scale)
  else:
    lo, hi = np.minimum(lo, f32(0)), np.maximum(hi, f32(0))
    scale = (hi - lo) * (f32(1) / (qmax - qmin))
    safe = np.where(scale > 0, scale, f32(1))
    zp = np.clip(np.round(qmin - lo * (f32(1) / safe)), qmin, qmax)
  scale = scale.astype(f32)
  with np.errstate(divide="ignore"):
    inv = np.where(scale == 0, f32(0), f32(1) / scale).astype(f32)
  codes = np.clip(np.round(x * inv) + zp, qmin, qmax)
  if signed and symmetric and bits == 1:
    codes = np.where(x >= 0, f32(1), f32(-1))
  return ((codes - zp) * scale).astype(f32)


def _np_percentile(v, spec, axes, p):
  pct = functools.partial(np.percentile, axis=axes, keepdims=True)
  if spec.signed and spec.symmetric:
    t = pct(np.abs(v), p)
    return -t, t
  if spec.signed:
    return pct(v, 100 - p), pct(v, p)
  return v.min(axis=axes, keepdims=True), pct(v, p)


def _np_mse(v, bits, spec, axes, n):
  lo, hi = v.min(axis=axes, keepdims=True), v.max(axis=axes, keepdims=True)
  fractions = np.arange(n, 0, -1, dtype=np.float32) * np.float32(1 / n)
  errors = np.stack([
      np.mean((_np_fake_quant(v, bits, f * lo, f * hi, spec.signed, spec.symmetric)
               - v) ** 2, axis=axes, keepdims=True) for f in fractions])
  f = fractions[np.argmin(errors, axis=0)]
  return f * lo, f * hi, errors


# ------------------------------------------------------------ simple methods


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_minmax_percentile_ema_match_numpy(granularity, grid):
  spec, view, axes = _case(granularity, grid)
  x = _data(1, nonneg=grid == "unsigned")
  v = view(x)
  want_shape = affine.compute_range(jnp.asarray(x), spec)[0].shape

  lo, hi = _calibrate(x, 4, spec, "minmax")
  assert lo.shape == hi.shape == want_shape
  np.testing.assert_array_equal(lo, v.min(axis=axes, keepdims=True))
  np.testing.assert_array_equal(hi, v.max(axis=axes, keepdims=True))

  for p in (99.0, 90.0, 100.0):
    lo, hi = _calibrate(x, 4, spec, "percentile", percentile=p)
    want_lo, want_hi = _np_percentile(v, spec, axes, p)
    assert lo.shape == want_shape
    np.testing.assert_allclose(lo, want_lo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-5, atol=1e-6)

  xs = np.stack([_data(s, nonneg=grid == "unsigned") for s in range(2, 6)])
  lo, hi = _calibrate(xs, 4, spec, "ema", decay=0.8)
  want_lo, want_hi = None, None
  for b in xs:
    blo, bhi = view(b).min(axis=axes, keepdims=True), view(b).max(axis=axes, keepdims=True)
    want_lo = blo if want_lo is None else np.float32(0.8) * want_lo + np.float32(0.2) * blo
    want_hi = bhi if want_hi is None else np.float32(0.8) * want_hi + np.float32(0.2) * bhi
  assert lo.shape == want_shape
  np.testing.assert_allclose(lo, want_lo, rtol=1e-6)
  np.testing.assert_allclose(hi, want_hi, rtol=1e-6)


def test_ema_streaming_matches_scan_and_first_batch_initialises():
  spec = AffineSpec(channel_axis=-1)
  xs = jnp.asarray(np.stack([_data(s) for s in range(3)]))
  cal = calibration.ema_calibrator(spec, decay=0.9)
  state = cal.init(jnp.zeros(SHAPE))
  assert int(state.count) == 0
  update = jax.jit(cal.update)
  state = update(state, xs[0])
  np.testing.assert_array_equal(state.lo, calibration.minmax_range(xs[0], spec)[0])
  for x in xs[1:]:
    state = update(state, x)
  assert int(state.count) == 3
  lo, hi = calibration.ema_range(xs, spec, decay=0.9)
  np.testing.assert_allclose(state.lo, lo, rtol=1e-6)
  np.testing.assert_allclose(state.hi, hi, rtol=1e-6)
  # decay may be traced.
  lo_t, _ = jax.jit(lambda d: calibration.ema_range(xs, spec, d))(0.9)
  np.testing.assert_allclose(lo_t, lo, rtol=1e-6)


# ----------------------------------------------------------------------- MSE


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_mse_matches_numpy(granularity, grid):
  spec, view, axes = _case(granularity, grid)
  x = _data(2, nonneg=grid == "unsigned")
  v = view(x)
  for bits in (1, 2, 4, 8):
    lo, hi = _calibrate(x, bits, spec, "mse", num_candidates=50)
    want_lo, want_hi, errors = _np_mse(v, bits, spec, axes, 50)
    assert lo.shape == affine.compute_range(jnp.asarray(x), spec)[0].shape
    mismatch = ~np.isclose(np.asarray(hi), want_hi, rtol=1e-6)
    if np.any(mismatch):
      # Summation order differs from numpy's; a different pick is allowed only
      # for a tie up to float32 rounding.
      fractions = np.arange(50, 0, -1, dtype=np.float32) * np.float32(1 / 50)
      vmax = v.max(axis=axes, keepdims=True)
      k = np.argmin(np.abs(fractions.reshape(-1, *vmax.shape) * vmax - hi), axis=0)
      got_err = np.take_along_axis(errors, k[None], axis=0)[0]
      np.testing.assert_allclose(got_err[mismatch], errors.min(axis=0)[mismatch], rtol=1e-5)
    else:
      np.testing.assert_allclose(lo, want_lo, rtol=1e-6)


@functools.partial(jax.jit, static_argnames="spec")
def _mse(x, bits, spec, lo, hi):
  return jnp.mean((affine.fake_quant(x, bits, spec, lo=lo, hi=hi) - x) ** 2)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel_last"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_no_worse_than_minmax_and_percentile(bits, granularity):
  spec = AffineSpec(**GRANULARITIES[granularity][0])
  # Heavy tails: Student's t with 2 degrees of freedom.
  x = np.random.default_rng(3).standard_t(2, size=(2048, 8)).astype(np.float32)
  mse = _mse(x, bits, spec, *_calibrate(x, bits, spec, "mse"))
  minmax = _mse(x, bits, spec, *_calibrate(x, bits, spec, "minmax"))
  pct = _mse(x, bits, spec, *_calibrate(x, bits, spec, "percentile", percentile=99.99))
  assert mse <= minmax * (1 + 1e-6)
  assert mse <= pct * (1 + 1e-6)
  if bits <= 4:  # With heavy tails at low bits the min-max clip is not the best.
    assert mse < minmax


def test_mse_chunked_matches_vmapped():
  spec = AffineSpec(channel_axis=0, symmetric=False)
  x = _data(4)
  want = _calibrate(x, 3, spec, "mse", num_candidates=40)
  got = _calibrate(x, 3, spec, "mse", num_candidates=40, chunk_size=7)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


# ---------------------------------------------------- shared properties


ALL = [("minmax", {}), ("percentile", {}), ("mse", {"num_candidates": 32}),
       ("kl", {"num_bins": 256})]


@pytest.mark.parametrize("method,options", ALL + [("ema", {})])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_constant_and_all_zero_channel(method, options, grid):
  spec = AffineSpec(channel_axis=-1, **GRIDS[grid])
  x = np.full((16, 3), 0.7, np.float32)
  x[:, 1] = 0.0
  x[:, 2] = 2.5
  xin = np.stack([x, x]) if method == "ema" else x
  for bits in (1, 4, 8):
    lo, hi = _calibrate(xin, bits, spec, method, **options)
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    np.testing.assert_array_equal(lo[0, 1], 0.0)
    np.testing.assert_array_equal(hi[0, 1], 0.0)
    y = affine.fake_quant(jnp.asarray(x), bits, spec, lo=lo, hi=hi)
    np.testing.assert_array_equal(y[:, 1], 0.0)
    want = x
    if spec.signed and spec.symmetric and bits > 1:
      # A positive constant c is (just past) the tie qmax + 1/2 of the scale
      # c / ((2^(b-1) - 1/2) (1 + 2^-20)), clipped to qmax = 2^(b-1) - 1.
      half = 2.0 ** (bits - 1)
      want = x * np.float32((half - 1) / ((half - 0.5) * (1 + 2.0 ** -20)))
    np.testing.assert_allclose(y, want, rtol=1e-6)


@pytest.mark.parametrize("method,options", ALL)
def test_jit_matches_eager(method, options):
  spec = AffineSpec(channel_axis=0, symmetric=False)
  x = _data(5, shape=(6, 10))
  want = _calibrate(x, 3, spec, method, **options)
  got = calibration.calibrate_range(jnp.asarray(x), 3, spec, method, **options)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


@pytest.mark.parametrize("method,options", ALL)
def test_traces_once_across_bits_and_vmap_matches_loop(method, options):
  spec = AffineSpec(channel_axis=-1)
  x = jnp.asarray(_data(6, shape=(64, 2)))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def cal(bits):
    return calibration.calibrate_range(x, bits, spec, method, **options)

  all_bits = jnp.array([1, 2, 3, 4, 5, 6, 7, 8, 32], jnp.int32)
  loop = [cal(b) for b in all_bits]
  batched = jax.vmap(cal)(all_bits)
  for k, (lo, hi) in enumerate(loop):
    np.testing.assert_allclose(batched[0][k], lo, rtol=1e-6)
    np.testing.assert_allclose(batched[1][k], hi, rtol=1e-6)
  chex.clear_trace_counter()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method,options", ALL + [("ema", {})])
def test_non_finite_range_is_nan_others_unaffected(method, options, bad):
  spec = AffineSpec(channel_axis=-1)
  x = _data(7, shape=(32, 3))
  dirty = x.copy()
  dirty[5, 1] = bad
  if method == "ema":
    x, dirty = np.stack([x, x]), np.stack([x, dirty])
  lo, hi = _calibrate(dirty, 4, spec, method, **options)
  want_lo, want_hi = _calibrate(x, 4, spec, method, **options)
  assert np.isnan(lo[0, 1]) and np.isnan(hi[0, 1])
  np.testing.assert_array_equal(lo[0, [0, 2]], want_lo[0, [0, 2]])
  np.testing.assert_array_equal(hi[0, [0, 2]], want_hi[0, [0, 2]])
  with pytest.raises(ValueError, match="non-finite"):
    affine.check_finite(dirty, "activations")


def test_dispatcher_and_errors():
  x = jnp.asarray(_data(8))
  spec = AffineSpec(channel_axis=-1)
  assert calibration.METHODS == ("minmax", "ema", "percentile", "mse", "kl")
  np.testing.assert_array_equal(
      calibration.calibrate_range(x, 4, spec, "percentile", percentile=95.0)[1],
      calibration.percentile_range(x, spec, 95.0)[1])
  with pytest.raises(ValueError, match=r"method is 'lsq'; allowed: minmax, ema, "):
    calibration.calibrate_range(x, 4, spec, "lsq")
  with pytest.raises(ValueError, match="percentile is 0"):
    calibration.percentile_range(x, spec, percentile=0)
  with pytest.raises(ValueError, match="decay is 1.0"):
    calibration.ema_calibrator(spec, decay=1.0)
  with pytest.raises(ValueError, match="num_candidates is 0"):
    calibration.mse_range(x, 4, spec, num_candidates=0)
  with pytest.raises(ValueError, match="xs has shape"):
    calibration.ema_range(jnp.zeros((0, 3)), spec)
