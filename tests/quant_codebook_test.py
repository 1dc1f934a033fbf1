"""Tests of k-means weight sharing: centroid gradients, sizes, the quantizer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.quant.codebook import KMeansWeight
from haqjax.quant.codebook import centroid_grads
from haqjax.quant.codebook import kmeans_size_bits
from haqjax.quant.kmeans1d import assign

SHAPE = (3, 3, 16, 32)  # One kernel shape and one `iters` for all k-means
ITERS = 300  # runs, so that they share compilations.


def _weights(seed=0):
  """Heavy-tailed, trained-looking weights: Student-t (3 d.o.f.) * 0.05."""
  rng = np.random.default_rng(seed)
  return (rng.standard_t(3, size=SHAPE) * 0.05).astype(np.float32)


def test_quantizer_keeps_nan_weights():
  # The quantizer leaves NaN weights NaN and quantizes the others.
  x = _weights().copy()
  x[0, 0, 0, 0] = np.nan
  q = KMeansWeight(iters=ITERS)
  params = q.calibrate(q.init(x), np.nan_to_num(x), 3)
  out = np.asarray(q(params, jnp.asarray(x), 3))
  assert np.isnan(out[0, 0, 0, 0]) and np.isfinite(out).sum() == x.size - 1


def test_centroid_grads_hand_computed():
  g = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]])
  labels = jnp.array([[0, 0], [1, 1], [1, 3]])
  # Cluster 0: 1+2; cluster 1: 3+4+5; cluster 2: empty; cluster 3: -6.
  np.testing.assert_allclose(centroid_grads(g, labels, "sum")[:4], [3.0, 12.0, 0.0, -6.0])
  np.testing.assert_allclose(centroid_grads(g, labels, "mean")[:4], [1.5, 4.0, 0.0, -6.0])
  with pytest.raises(ValueError, match="rule is 'max'"):
    centroid_grads(g, labels, "max")


@pytest.mark.parametrize("grad_rule", ["sum", "mean"])
@pytest.mark.parametrize("weight_grad", ["none", "ste"])
def test_quantizer_gradients(grad_rule, weight_grad):
  x = jnp.asarray(_weights(2))
  q = KMeansWeight(grad_rule=grad_rule, weight_grad=weight_grad, iters=ITERS)
  params = q.calibrate(q.init(x), x, 3)
  labels = assign(params["codebook"], x, 3)
  upstream = jax.random.normal(jax.random.key(0), x.shape)
  loss = lambda p, x: jnp.sum(q(p, x, 3) * upstream)
  out = q(params, x, 3)
  np.testing.assert_array_equal(out, params["codebook"][labels])
  assert len(np.unique(np.asarray(out))) <= 8
  g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(g_params["codebook"],
                             centroid_grads(upstream, labels, grad_rule),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(g_x, upstream if weight_grad == "ste" else 0.0)
  # Float bits: the weights pass through, the codebook gets nothing.
  np.testing.assert_array_equal(q(params, x, 32), x)
  g_params, g_x = jax.grad(lambda p, x: jnp.sum(q(p, x, 32) * upstream),
                           argnums=(0, 1))(params, x)
  np.testing.assert_array_equal(g_params["codebook"], 0.0)
  np.testing.assert_array_equal(g_x, upstream)


def test_jit_matches_eager_and_traces_once():
  x = jnp.asarray(_weights(3))
  q = KMeansWeight(init_method="kmeans++", iters=ITERS)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def calibrate_and_quantize(x, bits):
    params = q.calibrate(q.init(x), x, bits)
    return params, q(params, x, bits)

  for bits in range(1, 9):
    params, out = calibrate_and_quantize(x, jnp.int32(bits))
    eager = q.calibrate(q.init(x), x, bits)
    np.testing.assert_array_equal(params["codebook"], eager["codebook"])
    np.testing.assert_array_equal(out, q(eager, x, bits))
    assert len(np.unique(np.asarray(out))) <= 2 ** bits
  chex.clear_trace_counter()

  # vmap over bits gives the same codebooks and outputs as one bit-width at a
  # time (k-means++ included: its sums are written to round the same).
  bits = jnp.arange(1, 9)
  params, out = jax.vmap(calibrate_and_quantize, (None, 0))(x, bits)
  for i, b in enumerate(range(1, 9)):
    eager = q.calibrate(q.init(x), x, b)
    np.testing.assert_array_equal(params["codebook"][i], eager["codebook"])
    np.testing.assert_array_equal(out[i], q(eager, x, b))


def test_size_bits():
  np.testing.assert_array_equal(kmeans_size_bits(1000, 4), 1000 * 4 + 16 * 32)
  np.testing.assert_array_equal(kmeans_size_bits(1000, 2, codebook_bits=16), 2000 + 4 * 16)
  np.testing.assert_array_equal(kmeans_size_bits(1000, 32), 32000)  # Float: no codebook.
  got = kmeans_size_bits(jnp.array([100, 200]), jnp.array([[1], [8]]))
  np.testing.assert_array_equal(got, [[100 + 64, 200 + 64], [800 + 8192, 1600 + 8192]])


@pytest.mark.parametrize("kwargs, message", [
    ({"grad_rule": "avg"}, "grad_rule is 'avg'"),
    ({"weight_grad": "identity"}, "weight_grad is 'identity'"),
    ({"init_method": "uniform"}, "init_method is 'uniform'"),
    ({"iters": -3}, "iters is -3"),
])
def test_quantizer_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    KMeansWeight(**kwargs)
