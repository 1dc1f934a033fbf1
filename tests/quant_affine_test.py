"""Affine fake-quant against a plain numpy reference, bits 1..8, all granularities."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.quant import affine
from haqjax.quant.affine import AffineSpec


def _np_grid(bits, signed, narrow):
  if signed:
    return -(2.0 ** (bits - 1)) + narrow, 2.0 ** (bits - 1) - 1
  return float(narrow), 2.0 ** bits - 1


def _np_fake_quant(x, bits, spec):
  """Reference: groups by reshaping, then the module docstring's formulas."""
  x = np.asarray(x, np.float32)
  ndim = x.ndim
  channels = {a % ndim for a in spec.channel_axes}
  xg = x
  if spec.group_size:
    g = spec.group_axis % ndim
    xg = x.reshape(*x.shape[:g], x.shape[g] // spec.group_size, spec.group_size,
                   *x.shape[g + 1:])
    keep = {a if a <= g else a + 1 for a in channels} | {g}
    axes = tuple(a for a in range(ndim + 1) if a not in keep)
  else:
    axes = tuple(a for a in range(ndim) if a not in channels)
  lo = xg.min(axis=axes, keepdims=True)
  hi = xg.max(axis=axes, keepdims=True)
  qmin, qmax = _np_grid(bits, spec.signed, spec.narrow_range)
  if spec.symmetric and spec.signed:
    absmax = np.maximum(np.abs(lo), np.abs(hi))
    # PyTorch's symmetric observer: max|x| / ((qmax - qmin) / 2) = max|x| /
    # (2^(b-1) - 1/2); narrow range max|x| / qmax; binary max|x|.
    if bits == 1 or spec.narrow_range:
      levels = np.float32(1.0 if bits == 1 else qmax)
    else:  # Widened by one part in 2^20, so that -max|x| rounds past the tie.
      levels = np.float32(qmax - qmin) * np.float32(0.5 + 2.0 ** -21)
    scale = (absmax * (np.float32(1) / levels)).astype(np.float32)
    zp = np.zeros_like(scale)
  elif spec.symmetric:
    absmax = np.maximum(hi, 0)
    scale = (absmax * np.float32(1.0 / max(qmax, 1.0))).astype(np.float32)
    zp = np.zeros_like(scale)
  else:
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = ((hi - lo) * np.float32(1.0 / max(qmax - qmin, 1.0))).astype(np.float32)
    safe = np.where(scale == 0, 1, scale).astype(np.float32)
    zp = np.clip(np.round(qmin - lo * (np.float32(1) / safe)), qmin, qmax)
  with np.errstate(divide="ignore"):
    inv = np.where(scale == 0, 0, np.float32(1) / scale).astype(np.float32)
  codes = np.clip(np.round(xg * inv) + zp, qmin, qmax)
  if spec.signed and spec.symmetric and bits == 1:
    codes = np.where(xg >= 0, 1.0, -1.0)
  return ((codes - zp) * scale).reshape(x.shape).astype(np.float32), codes


SPECS = {
    "tensor_sym": AffineSpec(),
    "tensor_asym": AffineSpec(symmetric=False),
    "tensor_unsigned": AffineSpec(signed=False),
    "tensor_unsigned_asym_narrow": AffineSpec(signed=False, symmetric=False, narrow_range=True),
    "channel_last_narrow": AffineSpec(channel_axis=-1, narrow_range=True),
    "channel_first_asym": AffineSpec(channel_axis=0, symmetric=False),
    "channel_two_axes": AffineSpec(channel_axis=(0, 3)),
    "group_in_axis": AffineSpec(channel_axis=-1, group_size=4, group_axis=-2),
    "group_asym_no_channel": AffineSpec(symmetric=False, group_size=3, group_axis=0),
}


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("name", sorted(SPECS))
def test_fake_quant_matches_numpy(bits, name):
  spec = SPECS[name]
  x = np.random.default_rng(bits).standard_t(3, size=(3, 2, 8, 5)).astype(np.float32)
  if not spec.signed:
    x = np.abs(x)
  want, want_codes = _np_fake_quant(x, bits, spec)
  got = affine.fake_quant(jnp.asarray(x), bits, spec)
  np.testing.assert_array_equal(np.asarray(got), want)
  lo, hi = affine.compute_range(jnp.asarray(x), spec)
  scale, zp = affine.compute_scale(lo, hi, bits, spec)
  codes = affine.quantize(affine.to_groups(jnp.asarray(x), spec), scale, zp, bits, spec)
  np.testing.assert_array_equal(np.asarray(codes), want_codes)
  qmin, qmax = _np_grid(bits, spec.signed, spec.narrow_range)
  if not (spec.signed and spec.symmetric and bits == 1):
    assert codes.min() >= qmin and codes.max() <= qmax
  assert np.all(np.asarray(codes) == np.round(np.asarray(codes)))


@pytest.mark.parametrize("rounding, fn", [("floor", np.floor), ("ceil", np.ceil),
                                          ("nearest_even", np.round)])
def test_deterministic_roundings(rounding, fn):
  spec = AffineSpec(signed=False, rounding=rounding)
  x = jnp.asarray([0.0, 0.5, 1.0, 1.5, 2.5, 3.0], jnp.float32)
  codes = affine.quantize(x, jnp.float32(1.0), jnp.float32(0.0), 2, spec)
  np.testing.assert_array_equal(codes, np.clip(fn(np.asarray(x)), 0, 3))
  if rounding == "nearest_even":  # Ties to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    np.testing.assert_array_equal(codes, [0, 0, 1, 2, 2, 3])


def test_stochastic_rounding_is_unbiased_and_needs_a_key():
  spec = AffineSpec(signed=False, rounding="stochastic")
  x = jnp.full((200_000,), 1.3, jnp.float32)
  codes = affine.quantize(x, jnp.float32(1.0), jnp.float32(0.0), 4, spec,
                          key=jax.random.key(0))
  assert set(np.unique(np.asarray(codes))) == {1.0, 2.0}
  assert abs(float(codes.mean()) - 1.3) < 0.005
  again = affine.quantize(x, jnp.float32(1.0), jnp.float32(0.0), 4, spec,
                          key=jax.random.key(0))
  np.testing.assert_array_equal(codes, again)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    affine.quantize(x, jnp.float32(1.0), jnp.float32(0.0), 4, spec)


def test_edge_cases_constant_zero_and_float_bits():
  zeros = jnp.zeros((3, 4))
  np.testing.assert_array_equal(affine.fake_quant(zeros, 4, AffineSpec(channel_axis=-1)), zeros)
  np.testing.assert_array_equal(affine.fake_quant(zeros, 4, AffineSpec(symmetric=False)), zeros)
  for bits in range(1, 9):
    np.testing.assert_array_equal(affine.fake_quant(zeros, bits), zeros)
  const = jnp.full((5,), 0.37, jnp.float32)
  for spec in (AffineSpec(symmetric=False), AffineSpec(signed=False),
               AffineSpec(narrow_range=True)):
    for bits in range(2, 9):
      np.testing.assert_allclose(affine.fake_quant(const, bits, spec), const, rtol=1e-6)
  for bits in range(2, 9):
    # Signed symmetric, scale m / ((2^(b-1) - 1/2) (1 + 2^-20)): -m rounds to
    # the code qmin = -2^(b-1), half a step beyond it, and +m is clipped to
    # qmax = 2^(b-1) - 1, half a step short of it.
    half = 2.0 ** (bits - 1)
    scale = 0.37 / ((half - 0.5) * (1 + 2.0 ** -20))
    np.testing.assert_allclose(affine.fake_quant(-const, bits), -half * scale, rtol=1e-6)
    np.testing.assert_allclose(affine.fake_quant(const, bits), (half - 1) * scale, rtol=1e-6)
  # One all-zero channel beside a live one: the live one is untouched by it.
  x = jnp.stack([jnp.zeros(6), jnp.linspace(-1, 1, 6)], axis=-1)
  out = affine.fake_quant(x, 3, AffineSpec(channel_axis=-1))
  np.testing.assert_array_equal(out[:, 0], 0.0)
  assert np.all(np.isfinite(out))
  y = jnp.linspace(-3, 3, 7)
  np.testing.assert_array_equal(affine.fake_quant(y, 32), y)


def test_nan_propagates_and_check_finite_names_the_tensor():
  x = jnp.asarray([1.0, jnp.nan, -2.0])
  for spec in (AffineSpec(), AffineSpec(symmetric=False), AffineSpec(signed=False)):
    # Documented: a non-finite value poisons its whole range.
    assert np.all(np.isnan(affine.fake_quant(x, 4, spec)))
    assert np.all(np.isnan(affine.fake_quant(jnp.asarray([1.0, jnp.inf]), 4, spec)))
  per_channel = affine.fake_quant(jnp.asarray([[1.0, jnp.nan], [2.0, 3.0]]), 4,
                                  AffineSpec(channel_axis=-1))
  assert np.all(np.isfinite(per_channel[:, 0])) and np.all(np.isnan(per_channel[:, 1]))
  with pytest.raises(ValueError, match="kernel of conv1 has 1 non-finite"):
    affine.check_finite(x, "kernel of conv1")
  with pytest.raises(ValueError, match="non-finite"):
    affine.check_finite(jnp.asarray([jnp.inf]), "x")
  affine.check_finite(jnp.ones(3), "x")


def test_bad_specs_are_one_line_errors():
  with pytest.raises(ValueError, match="rounding is 'up'; allowed: nearest_even"):
    AffineSpec(rounding="up")
  with pytest.raises(ValueError, match="group_size is 0"):
    AffineSpec(group_size=0)
  with pytest.raises(ValueError, match="group_size is 3; allowed: a divisor of the 8"):
    affine.fake_quant(jnp.ones((8, 2)), 4, AffineSpec(group_size=3, group_axis=0))
  with pytest.raises(ValueError, match="channel_axis is 5"):
    affine.fake_quant(jnp.ones((8, 2)), 4, AffineSpec(channel_axis=5))


@pytest.mark.parametrize("name", ["tensor_asym", "channel_last_narrow", "group_in_axis"])
def test_jit_equals_eager_and_traces_once(name):
  spec = SPECS[name]
  x = jax.random.normal(jax.random.key(0), (3, 2, 8, 5))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fq(x, bits):
    return affine.fake_quant(x, bits, spec)

  chex.clear_trace_counter()
  for bits in list(range(1, 9)) + [32]:
    np.testing.assert_array_equal(fq(x, jnp.int32(bits)), affine.fake_quant(x, bits, spec))


def test_vmap_over_bits_equals_loop():
  spec = AffineSpec(channel_axis=-1, symmetric=False)
  x = jax.random.normal(jax.random.key(1), (16, 8))
  bits = jnp.arange(1, 9)
  batched = jax.jit(jax.vmap(lambda b: affine.fake_quant(x, b, spec)))(bits)
  single = jax.jit(lambda b: affine.fake_quant(x, b, spec))
  for i, b in enumerate(bits):
    np.testing.assert_array_equal(batched[i], single(b))


def test_levels_and_error_bound():
  x = jax.random.uniform(jax.random.key(2), (4096,), minval=-1.0, maxval=1.0)
  for bits in range(2, 9):
    out = np.asarray(affine.fake_quant(x, bits, AffineSpec(symmetric=False)))
    assert len(np.unique(out)) <= 2 ** bits
    lo, hi = float(jnp.min(x)), float(jnp.max(x))
    step = (max(hi, 0) - min(lo, 0)) / (2 ** bits - 1)
    # Half a step of rounding plus at most half a step of zero-point rounding.
    assert np.max(np.abs(out - np.asarray(x))) <= step + 1e-6


@pytest.mark.parametrize("narrow", [False, True])
def test_signed_symmetric_grid_extremes(narrow):
  # 10^4 channels with absmax spread over many binades: -max|x| is the code
  # qmin = -2^(b-1) (the tie qmin + 1/2 of exact arithmetic, which float32
  # alone would round either way), +max|x| the code qmax; narrow range
  # reproduces both ends.
  rng = np.random.default_rng(7)
  m = (rng.uniform(0.5, 1.0, 10_000) * np.exp2(rng.integers(-20, 20, 10_000)))
  x = jnp.asarray(np.stack([-m, m, -0.999 * m]).astype(np.float32))  # [3, C]
  spec = AffineSpec(channel_axis=-1, narrow_range=narrow)

  def codes(x, bits):
    scale, zp = affine.compute_scale(*affine.compute_range(x, spec), bits, spec)
    return affine.quantize(x, scale, zp, bits, spec)

  for bits in (2, 3, 4, 8):
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if narrow else -qmax - 1
    for got in (codes(x, bits), jax.jit(codes)(x, jnp.int32(bits))):
      got = np.asarray(got)
      np.testing.assert_array_equal(got[0], qmin)
      np.testing.assert_array_equal(got[1], qmax)
      np.testing.assert_array_equal(got[2], -qmax)  # off the tie: rounds inwards
