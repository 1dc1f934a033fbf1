"""BN-folding maths: folded kernel and bias, in jax.numpy and in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.nn import bn_folding


def test_folded_kernel_and_bias_is_differentiable_and_uses_own_bias():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
  bn = {"scale": jnp.arange(1.0, 6.0), "bias": jnp.ones(5)}
  stats = {"mean": jnp.full(5, 0.5), "var": jnp.full(5, 4.0)}
  w, b = bn_folding.folded_kernel_and_bias(kernel, bn, stats, eps=0.0 + 1e-5,
                                           bias=jnp.full(5, 2.0))
  mul = bn["scale"] / jnp.sqrt(4.0 + 1e-5)
  np.testing.assert_allclose(w, kernel * mul, rtol=1e-6)
  np.testing.assert_allclose(b, 1.0 + 1.5 * mul, rtol=1e-6)
  grad = jax.grad(lambda g: bn_folding.folded_kernel_and_bias(
      kernel, {"scale": g, "bias": bn["bias"]}, stats)[0].sum())(bn["scale"])
  assert grad.shape == (5,) and bool(jnp.all(grad != 0))


def test_missing_scale_and_bias_are_one_and_zero():
  kernel = jax.random.normal(jax.random.key(0), (4, 3))
  stats = {"mean": jnp.array([0.5, -1.0, 2.0]), "var": jnp.array([1.0, 4.0, 0.25])}
  w, b = bn_folding.folded_kernel_and_bias(kernel, {}, stats)
  w1, b1 = bn_folding.folded_kernel_and_bias(
      kernel, {"scale": jnp.ones(3), "bias": jnp.zeros(3)}, stats)
  np.testing.assert_array_equal(w, w1)
  np.testing.assert_array_equal(b, b1)


def test_numpy_float64_agrees_with_jax_float32():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 2, 6))
  bn = {"scale": rng.uniform(-1.5, 1.5, 6), "bias": rng.normal(size=6)}
  stats = {"mean": rng.normal(size=6), "var": rng.uniform(0.5, 2.0, 6)}
  w64, b64 = bn_folding.folded_kernel_and_bias(kernel, bn, stats, xp=np)
  assert w64.dtype == np.float64 and isinstance(w64, np.ndarray)
  w32, b32 = bn_folding.folded_kernel_and_bias(kernel, bn, stats)
  assert w32.dtype == jnp.float32
  # float32 inputs round once each (half an ulp, 2^-24 relative), and the
  # sqrt, divide, multiply and add round once more each: a few ulps.
  np.testing.assert_allclose(w32, w64, rtol=8 * 2.0 ** -24, atol=0)
  # The bias `beta - mean * mul` to a few ulps of its two terms' magnitudes.
  terms = np.abs(bn["bias"]) + np.abs(stats["mean"] * bn["scale"]) / np.sqrt(stats["var"])
  assert np.all(np.abs(np.asarray(b32, np.float64) - b64) <= 8 * 2.0 ** -24 * terms)


def test_errors():
  with pytest.raises(ValueError, match="BN mean has shape"):
    bn_folding.folded_kernel_and_bias(jnp.ones((1, 1, 2, 3)), {},
                                      {"mean": jnp.zeros(2), "var": jnp.ones(3)})
  for eps in (0, 1.5, "1e-5"):
    with pytest.raises(ValueError, match="eps is .*; allowed: a number in"):
      bn_folding.folded_kernel_and_bias(jnp.ones((1, 3)), {},
                                        {"mean": jnp.zeros(3), "var": jnp.ones(3)},
                                        eps=eps)
