"""gemmlowp / TFLite fixed-point arithmetic against exact Python integers."""

import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.deploy import fixed_point as fp

INT32 = (-2**31, 2**31 - 1)


def _srdhm(a, b):
  if a == b == -2**31:
    return 2**31 - 1
  n = a * b + (2**30 if a * b >= 0 else 1 - 2**30)
  q = abs(n) // 2**31  # C division truncates toward zero
  return q if n >= 0 else -q


def _rdbpot(x, e):
  mask = (1 << e) - 1
  return (x >> e) + int((x & mask) > (mask >> 1) + (x < 0))


def _single(x, m, shift):
  n = 31 - shift
  return min(max((x * m + (1 << (n - 1))) >> n, INT32[0]), INT32[1])


def _draw(n, seed):
  rng = np.random.default_rng(seed)
  edges = np.array([0, 1, -1, 2**30, -2**30, INT32[0], INT32[1]])
  big = rng.integers(*INT32, n, endpoint=True)
  small = rng.integers(-300, 300, n)
  return np.concatenate([edges, big, small]).astype(np.int32)


def test_high_mul_and_divide_by_pot_match_gemmlowp():
  a, b = _draw(2000, 0), _draw(2000, 1)
  got = np.asarray(fp.saturating_rounding_doubling_high_mul(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_array_equal(got, [_srdhm(int(x), int(y)) for x, y in zip(a, b)])
  e = np.random.default_rng(2).integers(0, 31, a.size).astype(np.int32)
  got = np.asarray(fp.rounding_divide_by_pot(jnp.asarray(a), jnp.asarray(e)))
  np.testing.assert_array_equal(got, [_rdbpot(int(x), int(k)) for x, k in zip(a, e)])


def test_ties():
  # High multiply: half up; divide by a power of two: half away from zero.
  half = np.int32(2**30)
  assert int(fp.saturating_rounding_doubling_high_mul(half, np.int32(1))) == 1
  assert int(fp.saturating_rounding_doubling_high_mul(-half, np.int32(1))) == 0
  np.testing.assert_array_equal(
      fp.rounding_divide_by_pot(jnp.array([3, -3, 5, -5], jnp.int32), 1), [2, -2, 3, -3])


def test_single_rounding_matches_tflite():
  rng = np.random.default_rng(3)
  x = _draw(2000, 4)
  m = rng.integers(-2**31 + 1, 2**31, x.size).astype(np.int32)
  shift = rng.integers(-31, 31, x.size).astype(np.int32)
  got = np.asarray(fp.single_rounding_multiply(jnp.asarray(x), jnp.asarray(m), jnp.asarray(shift)))
  np.testing.assert_array_equal(got, [_single(int(a), int(b), int(c))
                                      for a, b, c in zip(x, m, shift)])


@pytest.mark.parametrize("real", [0.3, 1.7, -0.02, 123.4, 0.5, 1 - 1e-12, 3e-9])
def test_quantize_multiplier(real):
  m, shift = fp.quantize_multiplier(real)
  assert 2**30 <= abs(int(m)) < 2**31
  np.testing.assert_allclose(int(m) * 2.0**(int(shift) - 31), real, rtol=2**-30)


def test_quantize_multiplier_zero_and_too_large():
  assert [int(v) for v in fp.quantize_multiplier(0.0)] == [0, 0]
  assert [int(v) for v in fp.quantize_multiplier(1e-12)] == [0, 0]
  with pytest.raises(ValueError, match="too large"):
    fp.quantize_multiplier(2.0**32)


def test_multiply_saturates_its_left_shift():
  # 2^30 * 2^3 saturates to 2^31 - 1 (and -2^31) before the high multiply by
  # 1/2, which gives 2^30 (and -2^30), not a wrapped value.
  big = jnp.array([2**30, -2**30], jnp.int32)
  out = fp.multiply_by_quantized_multiplier(big, jnp.int32(2**30), jnp.int32(3))
  np.testing.assert_array_equal(out, [2**30, -2**30])
