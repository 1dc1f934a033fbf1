"""Tests of the reconstruction loss: second moments against a direct evaluation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from haqjax.ptq.layer_geometry import LayerGeometry
from haqjax.ptq.reconstruction import reconstruction

CONV = LayerGeometry(kind="conv", strides=2, padding=((1, 1), (1, 1)), groups=2)
DENSE = LayerGeometry(kind="dense")


def _layer(kind, n=24):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  if kind == "conv":
    kernel, x_shape = 0.2 * jax.random.normal(k1, (3, 3, 4, 6)), (n, 6, 6, 8)
  else:
    kernel, x_shape = 0.2 * jax.random.normal(k1, (10, 6)), (n, 10)
  inputs = jax.nn.relu(jax.random.normal(k2, x_shape))
  w = kernel + 0.05 * jax.random.normal(k3, kernel.shape)  # a candidate kernel
  bias = jax.random.normal(k4, (kernel.shape[-1],))
  return kernel, w, inputs, bias, CONV if kind == "conv" else DENSE


@functools.partial(jax.jit, static_argnames=("geometry", "objective", "batch_size"))
def _losses(kernel, w, bias, inputs, target_inputs, *, geometry, objective, batch_size):
  loss = reconstruction(jax.random.key(1), kernel, bias, inputs, target_inputs,
                        geometry=geometry, act_fn=None, objective=objective,
                        batch_size=batch_size)
  return loss.full(w), loss.batch(w, jnp.int32(3))


def _direct(geometry, kernel, w, inputs, target_inputs):
  """Sum over output channels, mean over positions, in float64."""
  y_t = np.asarray(geometry.apply(target_inputs, kernel), np.float64)
  y = np.asarray(geometry.apply(inputs, w), np.float64)
  return np.mean(np.sum(np.square(y_t - y), axis=-1))


class ReconstructionTest(parameterized.TestCase):

  @parameterized.product(kind=("conv", "dense"), targets=(False, True))
  def test_moments_equal_the_direct_loss(self, kind, targets):
    kernel, w, inputs, bias, geometry = _layer(kind)
    noisy = inputs + 0.1 * jax.random.normal(jax.random.key(5), inputs.shape)
    x, x_t = (noisy, inputs) if targets else (inputs, None)
    want = _direct(geometry, kernel, w, x, inputs)
    # A chunk that does not divide the 24 examples exercises the padding.
    full, batch = _losses(kernel, w, bias, x, x_t, geometry=geometry,
                          objective="moments", batch_size=7)
    np.testing.assert_allclose(float(full), want, rtol=1e-4)
    self.assertEqual(float(batch), float(full))  # no sampling
    full_mb, _ = _losses(kernel, w, bias, x, x_t, geometry=geometry,
                         objective="minibatch", batch_size=7)
    np.testing.assert_allclose(float(full_mb), want, rtol=1e-4)

  def test_minibatch_samples_batch_size_examples(self):
    kernel, w, inputs, bias, geometry = _layer("dense")
    _, batch = _losses(kernel, w, bias, inputs, None, geometry=geometry,
                       objective="minibatch", batch_size=5)
    rows = jax.random.choice(jax.random.fold_in(jax.random.key(1), 3), 24, (5,),
                             replace=False)
    want = _direct(geometry, kernel, w, inputs[rows], inputs[rows])
    np.testing.assert_allclose(float(batch), want, rtol=1e-5)
