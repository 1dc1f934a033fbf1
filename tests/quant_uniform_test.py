"""Uniform quantizers (min-max and static ranges): values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import quant


@pytest.mark.parametrize("estimator", ["plain", "clipped"])
def test_static_range_estimators(estimator):
  q = quant.StaticRange(sign="signed", estimator=estimator)
  x = jnp.linspace(-3.0, 3.0, 13)
  params = q.calibrate(q.init(x), x[3:-3], 4)  # Calibrated on [-1.5, 1.5].
  np.testing.assert_allclose(params["hi"], 1.5)
  g = jax.grad(lambda x: jnp.sum(q(params, x, 4)))(x)
  if estimator == "plain":
    np.testing.assert_array_equal(g, 1.0)
  else:  # Zero outside the representable range [-8, 7] * 1.5 / 7.5.
    inside = (np.asarray(x) >= -8 * 1.5 / 7.5) & (np.asarray(x) <= 7 * 1.5 / 7.5)
    np.testing.assert_array_equal(g, inside.astype(np.float32))
  assert float(jnp.max(q(params, x, 4))) == pytest.approx(7 * 1.5 / 7.5)
  assert float(jnp.min(q(params, x, 4))) == pytest.approx(-8 * 1.5 / 7.5)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_unsigned_min_max_activation_clips_negatives_without_gradient(bits):
  q = quant.MinMaxActivation(sign="unsigned")
  x = jnp.linspace(-2.0, 3.0, 11)  # -2, -1.5, ..., 0, ..., 3
  out = q({}, x, bits)
  np.testing.assert_array_equal(out[x < 0], 0.0)  # clipped to the grid's 0
  np.testing.assert_allclose(out[-1], 3.0, rtol=1e-6)  # the max is on the grid
  g = jax.grad(lambda x: jnp.sum(q({}, x, bits)))(x)
  # Zero below the clip (negatives), the identity on [0, max].
  np.testing.assert_array_equal(g, (np.asarray(x) >= 0).astype(np.float32))
  # Floating point: nothing is clipped, the gradient is the identity.
  g = jax.grad(lambda x: jnp.sum(q({}, x, 32)))(x)
  np.testing.assert_array_equal(g, 1.0)


@pytest.mark.parametrize("sign", ["auto", "signed"])
@pytest.mark.parametrize("nonneg", [False, True])
def test_min_max_activation_without_clipping_has_identity_gradient(sign, nonneg):
  q = quant.MinMaxActivation(sign=sign)
  x = jnp.linspace(0.0 if nonneg else -2.0, 3.0, 11)
  g = jax.grad(lambda x: jnp.sum(q({}, x, 4)))(x)
  np.testing.assert_array_equal(g, 1.0)
  # The range is the min/max: an unsigned grid reaches the largest value, a
  # signed one (scale 3 / 7.5) clips it to the code 7.
  top = 3.0 if nonneg and sign == "auto" else 7 * 3.0 / 7.5
  np.testing.assert_allclose(q({}, x, 4)[-1], top, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_min_max_weight_levels_per_channel(bits):
  # Uniform weights, 4096 per output channel (about 16 per code at 8 bits);
  # channels 0-2 have their extreme at -1, channels 3-5 at +1.
  w = np.random.default_rng(bits).uniform(-1.0, 1.0, (4096, 6)).astype(np.float32)
  w[:2, :3] = [[-1.0], [0.999]]
  w[:2, 3:] = [[1.0], [-0.999]]

  def levels(quantizer):
    out = np.asarray(quantizer({}, jnp.asarray(w), bits))
    return [len(np.unique(out[:, c])) for c in range(w.shape[1])]

  # Scale max|w| / (2^(b-1) - 1/2): -max|w| reaches -2^(b-1), so a channel
  # whose extreme is negative uses all 2^b codes; a positive extreme is
  # clipped to 2^(b-1) - 1 and the channel uses 2^b - 1.
  full = 2 ** bits
  assert levels(quant.MinMaxWeight()) == [full] * 3 + [full - 1] * 3
  narrow = quant.MinMaxWeight(spec=quant.AffineSpec(channel_axis=-1, narrow_range=True))
  assert levels(narrow) == [full - 1] * 6


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_static_range_auto_sign_calibrates_under_jit(method):
  """Traced, `sign='auto'` picks the grid from the data as the eager call does."""
  q = quant.StaticRange(method=method)
  calibrate = jax.jit(q.calibrate)
  x = jax.random.normal(jax.random.key(0), (64, 5))
  for data in (x, jnp.abs(x) + 0.1):
    params = q.init(data)
    for bits in (3, 8):
      want = q.calibrate(params, data, bits)
      got = calibrate(params, data, jnp.int32(bits))
      np.testing.assert_allclose(got["lo"], want["lo"], rtol=1e-6)
      np.testing.assert_allclose(got["hi"], want["hi"], rtol=1e-6)
  # Non-negative data: the unsigned grid's calibration (for MSE, not the signed one's).
  fixed = {s: quant.StaticRange(method=method, sign=s).calibrate(params, data, 3)
           for s in ("signed", "unsigned")}
  got = calibrate(params, data, jnp.int32(3))
  np.testing.assert_allclose(got["hi"], fixed["unsigned"]["hi"], rtol=1e-6)
  if method == "mse":
    assert not np.allclose(fixed["signed"]["hi"], fixed["unsigned"]["hi"])
