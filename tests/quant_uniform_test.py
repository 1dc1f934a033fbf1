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
  else:  # Zero outside the representable range [-8, 7] * 1.5 / 7.
    inside = (np.asarray(x) >= -8 * 1.5 / 7) & (np.asarray(x) <= 1.5 + 1e-6)
    np.testing.assert_array_equal(g, inside.astype(np.float32))
  assert float(jnp.max(q(params, x, 4))) == pytest.approx(1.5)


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
  # The range is the min/max, so the grid reaches the largest value.
  np.testing.assert_allclose(q({}, x, 4)[-1], 3.0, rtol=1e-6)
