"""Tests of AdaRound on one layer: the learned rounding, its losses and options."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from haqjax.ptq import layer_rounding
from haqjax.ptq.layer_geometry import LayerGeometry
from haqjax.quant import affine
from haqjax.quant.affine import AffineSpec

CONV = LayerGeometry(kind="conv", strides=2, padding=((1, 1), (1, 1)))
DENSE = LayerGeometry(kind="dense")
SPEC = AffineSpec(channel_axis=-1)


def _layer(kind, seed=0, n=128):
  """A kernel and ReLU'd Gaussian inputs of a small conv or dense layer."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  if kind == "conv":
    kernel = 0.2 * jax.random.normal(k1, (3, 3, 8, 16))
    inputs = jax.nn.relu(jax.random.normal(k2, (n, 8, 8, 8)))
    return kernel, inputs, CONV
  kernel = 0.2 * jax.random.normal(k1, (24, 12))
  inputs = jax.nn.relu(jax.random.normal(k2, (n, 24)))
  return kernel, inputs, DENSE


def _identity(y):
  return y


@functools.partial(jax.jit, static_argnames=("geometry", "act"))
def _recon_jit(kernel, w, inputs, x_t, *, geometry, act):
  y_t = act(geometry.apply(x_t, kernel))
  y = act(geometry.apply(inputs, w))
  return jnp.mean(jnp.sum(jnp.square(y_t - y), axis=-1))


def _recon(geometry, kernel, w, inputs, target_inputs=None, act=_identity):
  """Reference loss: sum over output channels, mean over positions."""
  x_t = inputs if target_inputs is None else target_inputs
  return float(_recon_jit(kernel, w, inputs, x_t, geometry=geometry, act=act))


class AdaRoundLayerTest(parameterized.TestCase):

  @parameterized.product(kind=("conv", "dense"), bits=(3, 4))
  def test_beats_nearest_and_lands_on_grid(self, kind, bits):
    kernel, inputs, geometry = _layer(kind)
    w, info = layer_rounding.adaround_layer(jax.random.key(0), kernel, inputs, bits,
                                      layer=geometry, iters=400)
    # The reported losses (from second moments) match a direct evaluation.
    nearest = affine.fake_quant(kernel, bits, SPEC)
    np.testing.assert_allclose(float(info.recon_nearest),
                               _recon(geometry, kernel, nearest, inputs), rtol=1e-3)
    np.testing.assert_allclose(float(info.recon_adaround),
                               _recon(geometry, kernel, w, inputs), rtol=1e-3)
    self.assertLess(float(info.recon_adaround), 0.9 * float(info.recon_nearest))
    # On the grid: integer codes in [qmin, qmax], each the floor or the ceil.
    codes = np.asarray(w / info.scale)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    qmin, qmax = affine.qrange(bits, signed=True)
    self.assertTrue(np.all((codes >= float(qmin) - 1e-4) & (codes <= float(qmax) + 1e-4)))
    self.assertLessEqual(np.max(np.abs(codes - np.asarray(kernel / info.scale))), 1.0 + 1e-4)
    self.assertGreater(float(info.flipped), 0.0)

  def test_minibatch_with_activation_beats_nearest(self):
    kernel, inputs, geometry = _layer("dense", n=256)
    # Mini-batch gradients through the ReLU need more steps than the full-batch
    # tests (the paper runs 10k): at 400 the rounding is still mostly soft.
    w, info = layer_rounding.adaround_layer(jax.random.key(1), kernel, inputs, 3, layer=geometry,
                                      iters=4000, batch_size=64, act_fn=jax.nn.relu)
    nearest = affine.fake_quant(kernel, 3, SPEC)
    ref_near = _recon(geometry, kernel, nearest, inputs, act=jax.nn.relu)
    ref_ada = _recon(geometry, kernel, w, inputs, act=jax.nn.relu)
    np.testing.assert_allclose(float(info.recon_adaround), ref_ada, rtol=1e-4)
    self.assertLess(ref_ada, 0.9 * ref_near)

  def test_asymmetric_targets_match_direct_loss(self):
    kernel, inputs, geometry = _layer("conv", n=64)
    noisy = inputs + 0.1 * jax.random.normal(jax.random.key(5), inputs.shape)
    w, info = layer_rounding.adaround_layer(jax.random.key(2), kernel, noisy, 4, layer=geometry,
                                      target_inputs=inputs, iters=20, batch_size=24)
    np.testing.assert_allclose(float(info.recon_adaround),
                               _recon(geometry, kernel, w, noisy, inputs), rtol=1e-3)

  def test_one_trace_per_shape_across_bits(self):
    fn = layer_rounding._adaround  # pylint: disable=protected-access
    k1, inputs, geometry = _layer("dense", seed=1)
    k2, _, _ = _layer("dense", seed=2)
    run = lambda k, b: layer_rounding.adaround_layer(jax.random.key(0), k, inputs, b,
                                               layer=geometry, iters=7)
    jax.block_until_ready(run(k1, 4))
    before = fn._cache_size()  # pylint: disable=protected-access
    for kernel, bits in ((k2, 4), (k1, 3), (k2, 2), (k1, 8)):
      jax.block_until_ready(run(kernel, bits))
    self.assertEqual(fn._cache_size(), before)  # pylint: disable=protected-access

  @parameterized.named_parameters(
      ("iters", {"iters": 0}, "iters is 0"),
      ("batch_size", {"batch_size": -1}, "batch_size is -1"),
      ("warmup", {"warmup": 1.0}, "warmup is 1.0"),
      ("range_method", {"range_method": "kl"}, "range_method is 'kl'"),
      ("moments_with_act", {"objective": "moments", "act_fn": jax.nn.relu}, "objective"),
  )
  def test_bad_options(self, options, message):
    kernel, inputs, geometry = _layer("dense", n=8)
    with pytest.raises(ValueError, match=message) as err:
      layer_rounding.adaround_layer(jax.random.key(0), kernel, inputs, 4, layer=geometry,
                              **options)
    self.assertNotIn("\n", str(err.value))

  @parameterized.named_parameters(("conv", "conv", 5), ("dense", "dense", 23))
  def test_mismatched_input_channels(self, kind, channels):
    kernel, _, geometry = _layer(kind)
    shape = (4, 8, 8, channels) if kind == "conv" else (4, channels)
    with pytest.raises(ValueError, match="inputs have") as err:
      layer_rounding.adaround_layer(jax.random.key(0), kernel, jnp.ones(shape), 4, layer=geometry)
    self.assertNotIn("\n", str(err.value))
