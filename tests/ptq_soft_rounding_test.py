"""Tests of AdaRound's relaxation: h(V), its init, regulariser and schedule."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from haqjax.ptq import soft_rounding
from haqjax.quant import affine
from haqjax.quant.affine import AffineSpec

SPEC = AffineSpec(channel_axis=-1)


def _kernel(shape, seed=0):
  """A small Gaussian kernel (0.2 standard deviation)."""
  k1, _ = jax.random.split(jax.random.key(seed))
  return 0.2 * jax.random.normal(k1, shape)


class RelaxationTest(parameterized.TestCase):

  def test_init_reproduces_fractional_part(self):
    rest = jnp.linspace(0.0, 1.0, 101)
    h = soft_rounding.rectified_sigmoid(soft_rounding.init_logits(rest))
    np.testing.assert_allclose(h, rest, atol=2e-6)
    self.assertTrue(bool(jnp.all(jnp.isfinite(soft_rounding.init_logits(rest)))))

  def test_rectified_sigmoid_reaches_zero_and_one(self):
    h = soft_rounding.rectified_sigmoid(jnp.array([-10.0, 0.0, 10.0]))
    np.testing.assert_allclose(h, [0.0, 0.5, 1.0], atol=1e-6)
    self.assertEqual(float(h[0]), 0.0)
    self.assertEqual(float(h[2]), 1.0)

  def test_init_rounding_gives_back_the_kernel(self):
    kernel = _kernel((3, 3, 8, 16))

    @jax.jit
    def soft(kernel, bits):
      scale, zp = affine.compute_scale(*affine.compute_range(kernel, SPEC), bits, SPEC)
      v = soft_rounding.init_rounding(kernel, scale, SPEC)
      return soft_rounding.adaround_weights(kernel, v, scale, zp, bits, SPEC)

    # W inside the clip range [-8 s, 7 s], s = max|W| / 7.5 per channel: the
    # positive end (7 s, max|W|] is clipped to 7 s.
    scale = np.abs(np.asarray(kernel)).max(axis=(0, 1, 2)) / 7.5
    want = np.clip(np.asarray(kernel), -8 * scale, 7 * scale)
    self.assertGreater(int(np.sum(want != np.asarray(kernel))), 0)
    np.testing.assert_allclose(soft(kernel, 4), want, atol=1e-6)

  def test_round_regularizer(self):
    self.assertEqual(float(soft_rounding.round_regularizer(jnp.array([0.0, 1.0, 1.0]), 2.0)), 0.0)
    self.assertAlmostEqual(float(soft_rounding.round_regularizer(jnp.full((4,), 0.5), 20.0)), 4.0)
    self.assertAlmostEqual(float(soft_rounding.round_regularizer(jnp.array([0.25]), 2.0)), 0.75)

  def test_beta_schedule(self):
    steps = jnp.array([0, 10, 20, 60, 100])
    got = soft_rounding.beta_schedule(steps, 100, warmup=0.2, beta=(20.0, 2.0))
    np.testing.assert_allclose(got, [20.0, 20.0, 20.0, 11.0, 2.0], rtol=1e-6)
    got = soft_rounding.beta_schedule(jnp.array([0, 50]), 100, warmup=0.0, beta=(10.0, 2.0))
    np.testing.assert_allclose(got, [10.0, 6.0], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rounding_jit_agreement(self):
    kernel = _kernel((24, 12))
    scale, zp = affine.compute_scale(*affine.compute_range(kernel, SPEC), 3, SPEC)
    v = jax.random.normal(jax.random.key(3), kernel.shape)
    ref = {hard: np.asarray(soft_rounding.adaround_weights(kernel, v, scale, zp, 3, SPEC,
                                                      hard=hard))
           for hard in (False, True)}
    for hard in (False, True):
      fn = self.variant(lambda k, v, s, z, b, hard=hard: soft_rounding.adaround_weights(
          k, v, s, z, b, SPEC, hard=hard))
      got = fn(kernel, v, scale, zp, jnp.int32(3))
      if hard:  # on the grid: bit-exact
        np.testing.assert_array_equal(got, ref[hard])
      else:  # the fused sigmoid may differ by an ulp
        np.testing.assert_allclose(got, ref[hard], rtol=1e-6, atol=1e-7)
