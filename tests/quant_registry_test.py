"""Quantizers by name: what each name builds, and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import quant
from haqjax.quant import affine


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_weight_quantizer_zeroes_the_gradient_of_clipped_weights(bits):
  # Laplace weights with one large outlier per output channel: the least-MSE
  # clip is well inside max|w|, so the outliers are clipped.
  rng = np.random.default_rng(bits)
  w = rng.laplace(scale=0.05, size=(1024, 4)).astype(np.float32)
  w[0] = [1.0, -1.0, 0.8, -0.9]
  w = jnp.asarray(w)
  q = quant.weight_quantizer("mse")
  params = q.calibrate(q.init(w), w, bits)
  hi = np.asarray(params["hi"])  # [1, 4], symmetric: lo = -hi
  assert np.all(hi < 0.5 * np.max(np.abs(np.asarray(w)), axis=0))  # mse clips
  # The grid spans [qmin, qmax] * scale: codes outside it are clipped.
  spec = affine.AffineSpec(channel_axis=-1)
  scale, _ = affine.compute_scale(params["lo"], params["hi"], bits, spec)
  qmin, qmax = affine.qrange(bits, signed=True)
  rep_lo, rep_hi = np.asarray(qmin * scale), np.asarray(qmax * scale)
  inside = (np.asarray(w) >= rep_lo) & (np.asarray(w) <= rep_hi)
  assert 0 < np.sum(~inside) < w.size
  assert not np.any(inside[0])  # the outliers
  out = q(params, w, bits)
  np.testing.assert_allclose(out[~inside], np.where(np.asarray(w) > 0, rep_hi, rep_lo)[~inside],
                             rtol=1e-6)
  g = jax.grad(lambda w: jnp.sum(q(params, w, bits)))(w)
  np.testing.assert_array_equal(g, inside.astype(np.float32))
  # Floating point passes every weight through with the identity gradient.
  g = jax.grad(lambda w: jnp.sum(q(params, w, 32)))(w)
  np.testing.assert_array_equal(g, 1.0)


@pytest.mark.parametrize("name", quant.WEIGHT_QUANTIZERS)
def test_every_weight_quantizer_is_built(name):
  assert isinstance(quant.weight_quantizer(name), quant.Quantizer)


@pytest.mark.parametrize("name", quant.ACT_QUANTIZERS)
def test_every_act_quantizer_is_built(name):
  assert isinstance(quant.act_quantizer(name), quant.Quantizer)


def test_lsq_mse_is_lsq_with_the_least_error_initial_step():
  w, a = quant.weight_quantizer("lsq_mse"), quant.act_quantizer("lsq_mse")
  assert w == quant.LSQ(sign="signed", channel_axis=-1, step_init="mse")
  assert a == quant.LSQ(sign="auto", batch_axis=0, step_init="mse")
  assert quant.weight_quantizer("lsq").step_init == quant.act_quantizer("lsq").step_init == "mean"
