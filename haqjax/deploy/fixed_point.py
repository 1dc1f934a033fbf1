"""gemmlowp fixed-point requantization, exact in int32 arithmetic.

A real multiplier `M` is stored as an int32 `m` with `|m|` in `[2^30, 2^31)`
and an exponent `shift`, `M ~= m * 2^(shift - 31)` (TFLite's
`QuantizeMultiplier`, signed). `multiply_by_quantized_multiplier(x, m,
shift)` is TFLite's `MultiplyByQuantizedMultiplier`:

    SaturatingRoundingDoublingHighMul(x * 2^max(shift, 0), m)
    then RoundingDivideByPOT(., max(-shift, 0))

with the left shift saturating at the int32 limits. JAX runs without 64-bit
integers by default, so the 64-bit product of `SaturatingRoundingDoublingHighMul`
is formed from 16-bit limbs in uint32; the result equals gemmlowp's bit for
bit (round half up in the high multiply, round half away from zero in the
division by a power of two).

References:
  gemmlowp, fixedpoint.h and doc/quantization.md.
  https://github.com/google/gemmlowp
  Jacob et al. Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference. CVPR 2018, section 2.2.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from haqjax.typing import Array, ArrayLike


def quantize_multiplier(real: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """`(m, shift)` int32 arrays with `real ~= m * 2^(shift - 31)`.

  `|m|` is in `[2^30, 2^31)`, or `m = shift = 0` for a zero (or negligible,
  below `2^-31`) multiplier; the sign of `real` is the sign of `m`.

  Raises:
    ValueError: a non-finite multiplier or one of `2^31` or more.
  """
  real = np.asarray(real, np.float64)
  if not np.all(np.isfinite(real)):
    raise ValueError("requantization multiplier is not finite; allowed: finite scales")
  mant, exp = np.frexp(np.abs(real))  # |real| = mant * 2^exp, mant in [0.5, 1)
  m = np.round(mant * 2.0**31).astype(np.int64)
  carry = m == 2**31
  m = np.where(carry, 2**30, m)
  exp = np.where(carry, exp + 1, exp)
  tiny = (exp < -31) | (m == 0)
  if np.any(exp[~tiny] > 31):
    raise ValueError(f"requantization multiplier {np.max(np.abs(real))} is too large; "
                     "allowed: below 2^31")
  m = np.where(tiny, 0, np.where(real < 0, -m, m))
  shift = np.where(tiny, 0, exp)
  return m.astype(np.int32), shift.astype(np.int32)


def _mul_u32(a: Array, b: Array) -> tuple[Array, Array]:
  """The exact 64-bit product of uint32 `a`, `b` as uint32 `(hi, lo)`."""
  mask = jnp.uint32(0xFFFF)
  a0, a1 = a & mask, a >> 16
  b0, b1 = b & mask, b >> 16
  low = a0 * b0
  cross1, cross2 = a1 * b0, a0 * b1
  mid = cross1 + cross2
  mid_carry = (mid < cross1).astype(jnp.uint32)
  lo = low + (mid << 16)
  lo_carry = (lo < low).astype(jnp.uint32)
  hi = a1 * b1 + (mid >> 16) + (mid_carry << 16) + lo_carry
  return hi, lo


def saturating_rounding_doubling_high_mul(a: Array, b: Array) -> Array:
  """gemmlowp's `SaturatingRoundingDoublingHighMul` on int32 arrays (exact).

  `(a * b + (2^30 if a * b >= 0 else 1 - 2^30)) / 2^31`, the division
  truncating toward zero, on the exact product; `a = b = -2^31` saturates to
  `2^31 - 1`.
  """
  a = jnp.asarray(a, jnp.int32)
  b = jnp.asarray(b, jnp.int32)
  negative = (a < 0) != (b < 0)
  # |x| as uint32 (exact for -2^31 too).
  ua = jnp.where(a < 0, (~a).astype(jnp.uint32) + 1, a.astype(jnp.uint32))
  ub = jnp.where(b < 0, (~b).astype(jnp.uint32) + 1, b.astype(jnp.uint32))
  hi, lo = _mul_u32(ua, ub)
  product_zero = (hi == 0) & (lo == 0)
  negative = negative & ~product_zero
  # |result| = floor((|ab| + 2^30 - [ab < 0]) / 2^31).
  nudge = jnp.where(negative, jnp.uint32(2**30 - 1), jnp.uint32(2**30))
  lo2 = lo + nudge
  hi2 = hi + (lo2 < lo).astype(jnp.uint32)
  q = (hi2 << 1) | (lo2 >> 31)  # < 2^31 unless a = b = -2^31
  overflow = q >= jnp.uint32(2**31)
  q = jnp.where(overflow, jnp.uint32(2**31 - 1), q).astype(jnp.int32)
  return jnp.where(negative, -q, q)


def rounding_divide_by_pot(x: Array, exponent: Array) -> Array:
  """gemmlowp's `RoundingDivideByPOT`: `x / 2^exponent`, half away from zero."""
  x = jnp.asarray(x, jnp.int32)
  exponent = jnp.asarray(exponent, jnp.int32)
  mask = (jnp.int32(1) << exponent) - 1
  remainder = x & mask
  threshold = (mask >> 1) + (x < 0).astype(jnp.int32)
  return (x >> exponent) + (remainder > threshold).astype(jnp.int32)


def multiply_by_quantized_multiplier(x: Array, m: Array, shift: Array) -> Array:
  """TFLite's `MultiplyByQuantizedMultiplier(x, m, shift)`, saturating left shift."""
  x = jnp.asarray(x, jnp.int32)
  shift = jnp.asarray(shift, jnp.int32)
  left = jnp.maximum(shift, 0)
  right = jnp.maximum(-shift, 0)
  limit = jnp.int32(2**31 - 1) >> left  # |x| * 2^left fits when |x| <= limit
  shifted = jnp.clip(x, -limit - 1, limit) << left
  shifted = jnp.where(x > limit, jnp.int32(2**31 - 1), shifted)
  return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m), right)


def _negate64(hi: Array, lo: Array) -> tuple[Array, Array]:
  """Two's complement negation of the 64-bit `(hi, lo)` (uint32 halves)."""
  lo_n = ~lo + jnp.uint32(1)
  return ~hi + (lo_n == 0).astype(jnp.uint32), lo_n


def single_rounding_multiply(x: Array, m: Array, shift: Array) -> Array:
  """TFLite's single-rounding `MultiplyByQuantizedMultiplier` (exact, saturating).

  `(x * m + 2^(n - 1)) >> n` with `n = 31 - shift` (1..62) on the exact
  64-bit product: `x * m * 2^(shift - 31)` rounded half up, saturated to int32.
  """
  x = jnp.asarray(x, jnp.int32)
  m = jnp.asarray(m, jnp.int32)
  n = 31 - jnp.asarray(shift, jnp.int32)
  negative = (x < 0) != (m < 0)
  ux = jnp.where(x < 0, (~x).astype(jnp.uint32) + 1, x.astype(jnp.uint32))
  um = jnp.where(m < 0, (~m).astype(jnp.uint32) + 1, m.astype(jnp.uint32))
  hi, lo = _mul_u32(ux, um)
  neg_hi, neg_lo = _negate64(hi, lo)
  hi, lo = jnp.where(negative, neg_hi, hi), jnp.where(negative, neg_lo, lo)
  # + 2^(n - 1)
  small = n <= 32
  r_lo = jnp.where(small, jnp.uint32(1) << jnp.clip(n - 1, 0, 31).astype(jnp.uint32),
                   jnp.uint32(0))
  r_hi = jnp.where(small, jnp.uint32(0),
                   jnp.uint32(1) << jnp.clip(n - 33, 0, 31).astype(jnp.uint32))
  lo2 = lo + r_lo
  hi2 = hi + r_hi + (lo2 < lo).astype(jnp.uint32)
  hi_s = hi2.astype(jnp.int32)
  # >> n, arithmetic: below 32 from both halves, else from the high half.
  n_lo = jnp.clip(n, 1, 31).astype(jnp.uint32)
  low_part = (hi2 << (jnp.uint32(32) - n_lo)) | (lo2 >> n_lo)
  res_hi = hi_s >> jnp.clip(n, 1, 31)  # the high word of the shifted value
  fits = res_hi == (low_part.astype(jnp.int32) >> 31)
  saturated = jnp.where(res_hi < 0, jnp.int32(-2**31), jnp.int32(2**31 - 1))
  below = jnp.where(fits, low_part.astype(jnp.int32), saturated)
  above = hi_s >> jnp.clip(n - 32, 0, 31)
  return jnp.where(n < 32, below, above)
