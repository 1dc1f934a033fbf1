"""Tests of the 1-D k-means engine against numpy and scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from haqjax.quant.kmeans1d import assign
from haqjax.quant.kmeans1d import kmeans

SHAPE = (3, 3, 16, 32)  # One kernel shape and one `iters` for all k-means
ITERS = 300  # runs, so that they share compilations.


def _weights(seed=0):
  """Heavy-tailed, trained-looking weights: Student-t (3 d.o.f.) * 0.05."""
  rng = np.random.default_rng(seed)
  return (rng.standard_t(3, size=SHAPE) * 0.05).astype(np.float32)


def _np_assign(codebook, x, bits):
  """Nearest active centroid by brute force; ties to the lower index."""
  d = np.abs(x.reshape(-1, 1) - codebook[None, :2 ** bits])
  return np.argmin(d, axis=1).reshape(x.shape), d


@pytest.mark.parametrize("bits", range(1, 9))
def test_assign_matches_numpy(bits):
  rng = np.random.default_rng(bits)
  codebook = rng.normal(size=256).astype(np.float32)  # Unsorted on purpose.
  x = rng.normal(size=(50, 40)).astype(np.float32)
  got = np.asarray(assign(codebook, x, bits))
  want, d = _np_assign(codebook, x, bits)
  assert got.min() >= 0 and got.max() < 2 ** bits
  # Same distance as the brute force (labels may differ only on exact ties).
  rows = np.arange(x.size)
  np.testing.assert_array_equal(d[rows, got.ravel()], d[rows, want.ravel()])


def test_assign_ties_go_to_the_smaller_centroid():
  codebook = jnp.zeros(256).at[:4].set(jnp.array([0.0, 1.0, 1.0, 3.0]))
  x = jnp.array([0.5, 1.0, 2.0, 2.5, 5.0, -1.0])
  labels = assign(codebook, x, 2)
  np.testing.assert_array_equal(codebook[labels], [0.0, 1.0, 1.0, 3.0, 3.0, 0.0])


def test_inertia_no_worse_than_sklearn():
  # Same data, same algorithm (greedy k-means++, n_init=1, at most 300 Lloyd
  # iterations, tol=0), seeds 0..19 on each side, at 2, 3 and 4 bits. One
  # run's inertia varies by up to ~5% with the seed, so compare the mean
  # (within 1.5%) and the best run (within 0.1%).
  x = _weights()
  keys = jax.random.split(jax.random.key(0), 20)
  run = jax.vmap(lambda k, b: kmeans(k, x, b, iters=ITERS).inertia, (0, None))
  for bits in (2, 3, 4):
    ours = np.asarray(run(keys, bits))
    with threadpool_limits(1):  # Much faster than OpenMP on a busy machine.
      theirs = np.array([
          KMeans(2 ** bits, init="k-means++", n_init=1, algorithm="lloyd",
                 max_iter=ITERS, tol=0.0, random_state=seed).fit(x.reshape(-1, 1)).inertia_
          for seed in range(20)])
    assert ours.mean() <= 1.015 * theirs.mean(), bits
    assert ours.min() <= 1.001 * theirs.min(), bits


@pytest.mark.parametrize("init", ["kmeans++", "linear"])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_result_is_a_lloyd_fixed_point(init, bits):
  x = _weights(1)
  res = kmeans(jax.random.key(0), x, bits, iters=ITERS, init=init)
  k = 2 ** bits
  codebook, labels = np.asarray(res.codebook), np.asarray(res.labels)
  assert labels.shape == x.shape and labels.dtype == np.int32
  np.testing.assert_array_equal(res.active, np.arange(256) < k)
  np.testing.assert_array_equal(codebook[k:], 0.0)
  assert np.all(np.diff(codebook[:k]) >= 0)
  np.testing.assert_array_equal(res.counts, np.bincount(labels.ravel(), minlength=256))
  want, d = _np_assign(codebook, x, bits)
  rows = np.arange(x.size)
  np.testing.assert_array_equal(d[rows, labels.ravel()], d[rows, want.ravel()])
  for c in np.flatnonzero(res.counts):  # Converged: centroids are the means.
    np.testing.assert_allclose(codebook[c], x.ravel()[labels.ravel() == c].mean(),
                               rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(res.inertia, np.sum((x - codebook[labels]) ** 2), rtol=1e-5)
  assert int(res.iterations) < ITERS


def test_empty_clusters_keep_their_centroid():
  # Two groups; linear init puts 4 centroids at 0, 1/3, 2/3, 1: the middle
  # two never get a point and keep their initial values.
  x = jnp.tile(jnp.array([0.0, 0.01, 0.02, 0.98, 0.99, 1.0]), 768).reshape(SHAPE)
  res = kmeans(None, x, 2, iters=ITERS, init="linear")
  np.testing.assert_allclose(res.codebook[:4], [0.01, 1 / 3, 2 / 3, 0.99], rtol=1e-5)
  np.testing.assert_array_equal(res.counts[:4], [2304, 0, 0, 2304])
  np.testing.assert_array_equal(res.labels, jnp.where(x < 0.5, 0, 3))


@pytest.mark.parametrize("init", ["kmeans++", "linear"])
def test_constant_and_few_distinct_values(init):
  res = kmeans(jax.random.key(0), jnp.full(SHAPE, 0.25), 4, iters=ITERS, init=init)
  np.testing.assert_array_equal(res.codebook[:16], 0.25)
  np.testing.assert_array_equal(res.labels, 0)
  assert float(res.inertia) == 0.0
  # Three distinct values, 8 clusters: exact, duplicates never assigned.
  x = jnp.tile(jnp.array([-1.0, 0.0, 2.0]), 1536).reshape(SHAPE)
  res = kmeans(jax.random.key(0), x, 3, iters=ITERS, init=init)
  assert float(res.inertia) == 0.0
  np.testing.assert_array_equal(res.codebook[res.labels], x)
  assert np.all(np.isfinite(res.codebook))


def test_non_finite_input():
  x = _weights().copy()
  x[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or infinite"):
    kmeans(jax.random.key(0), x, 3)
  # Under jit it cannot raise: the codebook and inertia are NaN instead.
  res = jax.jit(lambda x: kmeans(None, x, 3, iters=ITERS, init="linear"))(x)
  assert np.all(np.isnan(res.codebook)) and np.isnan(res.inertia)


@pytest.mark.parametrize("kwargs, message", [
    ({"init": "random"}, "init is 'random'"),
    ({"iters": -1}, "iters is -1"),
    ({"local_trials": 0}, "local_trials is 0"),
])
def test_kmeans_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    kmeans(jax.random.key(0), jnp.ones(4), 2, **kwargs)
  with pytest.raises(ValueError, match="key is None"):
    kmeans(None, jnp.ones(4), 2)
