"""Tests of AdaRound: the relaxation, the schedule, the learned rounding."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from haqjax import models
from haqjax.nn.table import layer_table
from haqjax.policy import Policy
from haqjax.ptq import adaround
from haqjax.quant import affine
from haqjax.quant.affine import AffineSpec
from haqjax.quant.uniform import StaticRange

CONV = adaround.LayerGeometry(kind="conv", strides=2, padding=((1, 1), (1, 1)))
DENSE = adaround.LayerGeometry(kind="dense")
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


class RelaxationTest(parameterized.TestCase):

  def test_init_reproduces_fractional_part(self):
    rest = jnp.linspace(0.0, 1.0, 101)
    h = adaround.rectified_sigmoid(adaround.init_logits(rest))
    np.testing.assert_allclose(h, rest, atol=2e-6)
    self.assertTrue(bool(jnp.all(jnp.isfinite(adaround.init_logits(rest)))))

  def test_rectified_sigmoid_reaches_zero_and_one(self):
    h = adaround.rectified_sigmoid(jnp.array([-10.0, 0.0, 10.0]))
    np.testing.assert_allclose(h, [0.0, 0.5, 1.0], atol=1e-6)
    self.assertEqual(float(h[0]), 0.0)
    self.assertEqual(float(h[2]), 1.0)

  def test_init_rounding_gives_back_the_kernel(self):
    kernel, _, _ = _layer("conv")

    @jax.jit
    def soft(kernel, bits):
      scale, zp = affine.compute_scale(*affine.compute_range(kernel, SPEC), bits, SPEC)
      v = adaround.init_rounding(kernel, scale, SPEC)
      return adaround.adaround_weights(kernel, v, scale, zp, bits, SPEC)

    np.testing.assert_allclose(soft(kernel, 4), kernel, atol=1e-6)

  def test_round_regularizer(self):
    self.assertEqual(float(adaround.round_regularizer(jnp.array([0.0, 1.0, 1.0]), 2.0)), 0.0)
    self.assertAlmostEqual(float(adaround.round_regularizer(jnp.full((4,), 0.5), 20.0)), 4.0)
    self.assertAlmostEqual(float(adaround.round_regularizer(jnp.array([0.25]), 2.0)), 0.75)

  def test_beta_schedule(self):
    steps = jnp.array([0, 10, 20, 60, 100])
    got = adaround.beta_schedule(steps, 100, warmup=0.2, beta=(20.0, 2.0))
    np.testing.assert_allclose(got, [20.0, 20.0, 20.0, 11.0, 2.0], rtol=1e-6)
    got = adaround.beta_schedule(jnp.array([0, 50]), 100, warmup=0.0, beta=(10.0, 2.0))
    np.testing.assert_allclose(got, [10.0, 6.0], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rounding_jit_agreement(self):
    kernel, _, _ = _layer("dense")
    scale, zp = affine.compute_scale(*affine.compute_range(kernel, SPEC), 3, SPEC)
    v = jax.random.normal(jax.random.key(3), kernel.shape)
    ref = {hard: np.asarray(adaround.adaround_weights(kernel, v, scale, zp, 3, SPEC,
                                                      hard=hard))
           for hard in (False, True)}
    for hard in (False, True):
      fn = self.variant(lambda k, v, s, z, b, hard=hard: adaround.adaround_weights(
          k, v, s, z, b, SPEC, hard=hard))
      got = fn(kernel, v, scale, zp, jnp.int32(3))
      if hard:  # on the grid: bit-exact
        np.testing.assert_array_equal(got, ref[hard])
      else:  # the fused sigmoid may differ by an ulp
        np.testing.assert_allclose(got, ref[hard], rtol=1e-6, atol=1e-7)


class AdaRoundLayerTest(parameterized.TestCase):

  @parameterized.product(kind=("conv", "dense"), bits=(3, 4))
  def test_beats_nearest_and_lands_on_grid(self, kind, bits):
    kernel, inputs, geometry = _layer(kind)
    w, info = adaround.adaround_layer(jax.random.key(0), kernel, inputs, bits,
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
    w, info = adaround.adaround_layer(jax.random.key(1), kernel, inputs, 3, layer=geometry,
                                      iters=400, batch_size=64, act_fn=jax.nn.relu)
    nearest = affine.fake_quant(kernel, 3, SPEC)
    ref_near = _recon(geometry, kernel, nearest, inputs, act=jax.nn.relu)
    ref_ada = _recon(geometry, kernel, w, inputs, act=jax.nn.relu)
    np.testing.assert_allclose(float(info.recon_adaround), ref_ada, rtol=1e-4)
    self.assertLess(ref_ada, 0.9 * ref_near)

  def test_asymmetric_targets_match_direct_loss(self):
    kernel, inputs, geometry = _layer("conv", n=64)
    noisy = inputs + 0.1 * jax.random.normal(jax.random.key(5), inputs.shape)
    w, info = adaround.adaround_layer(jax.random.key(2), kernel, noisy, 4, layer=geometry,
                                      target_inputs=inputs, iters=20, batch_size=24)
    np.testing.assert_allclose(float(info.recon_adaround),
                               _recon(geometry, kernel, w, noisy, inputs), rtol=1e-3)

  def test_one_trace_per_shape_across_bits(self):
    fn = adaround._adaround  # pylint: disable=protected-access
    k1, inputs, geometry = _layer("dense", seed=1)
    k2, _, _ = _layer("dense", seed=2)
    run = lambda k, b: adaround.adaround_layer(jax.random.key(0), k, inputs, b,
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
      adaround.adaround_layer(jax.random.key(0), kernel, inputs, 4, layer=geometry,
                              **options)
    self.assertNotIn("\n", str(err.value))

  @parameterized.named_parameters(("conv", "conv", 5), ("dense", "dense", 23))
  def test_mismatched_input_channels(self, kind, channels):
    kernel, _, geometry = _layer(kind)
    shape = (4, 8, 8, channels) if kind == "conv" else (4, channels)
    with pytest.raises(ValueError, match="inputs have") as err:
      adaround.adaround_layer(jax.random.key(0), kernel, jnp.ones(shape), 4, layer=geometry)
    self.assertNotIn("\n", str(err.value))


class AdaRoundModelTest(parameterized.TestCase):

  @parameterized.named_parameters(("parallel", False), ("sequential", True))
  def test_digits_cnn(self, sequential):
    model = models.create("digits_cnn", num_classes=10)
    images = jax.nn.relu(jax.random.normal(jax.random.key(0), (64, 8, 8, 1)))
    variables = model.init(jax.random.key(1), images[:1])
    names = layer_table(model, (1, 8, 8, 1)).names
    policy = Policy.create(names, w_bits=[32, 3, 4], a_bits=32)
    res = adaround.adaround_model(jax.random.key(2), model, variables,
                                  [images[:32], images[32:]], policy,
                                  sequential=sequential, iters=30)
    self.assertEqual(sorted(res.ranges), sorted(names[1:]))
    np.testing.assert_array_equal(res.variables["params"][names[0]]["kernel"],
                                  variables["params"][names[0]]["kernel"])
    quantizer = StaticRange(spec=SPEC, sign="signed")
    for name, bits in zip(names[1:], (3, 4)):
      w = res.variables["params"][name]["kernel"]
      again = quantizer(res.ranges[name], w, bits)
      np.testing.assert_allclose(again, w, rtol=0, atol=1e-7)
      self.assertLess(float(res.infos[name].recon_adaround),
                      float(res.infos[name].recon_nearest))
