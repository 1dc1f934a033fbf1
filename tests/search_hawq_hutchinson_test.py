"""Hutchinson's trace estimator against exact Hessians of small losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from haqjax.search.hawq import hutchinson


def _loss(x, batch):
  """A non-quadratic loss with cross terms between the leaves."""
  h = jnp.tanh(batch["u"] @ x["a"])  # [B, 2]
  z = h @ x["b"][:2] + jnp.sin(batch["u"] @ x["b"][1:]) * x["a"][0, 0]
  return (jnp.mean(jnp.log1p(z ** 2)) + 0.1 * jnp.sum(x["a"] ** 4)
          + 0.5 * jnp.mean(batch["u"] ** 2) * jnp.sum(x["b"] ** 2))


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  x = {"a": jax.random.normal(k1, (3, 2)), "b": jax.random.normal(k2, (4,))}
  batches = [{"u": jax.random.normal(k, (5, 3))} for k in jax.random.split(k3, 2)]
  return x, batches


def _exact(x, batches):
  """Per leaf: the trace of the mean Hessian's block, and the estimator's
  variance per probe (Rademacher, joint probes, independent per batch)."""
  flat, unravel = ravel_pytree(x)
  sizes = {"a": 6, "b": 4}  # ravel_pytree orders dict leaves by key.
  slices = {"a": slice(0, 6), "b": slice(6, 10)}
  hessians = [np.asarray(jax.hessian(lambda f: _loss(unravel(f), b))(flat), np.float64)
              for b in batches]
  n = len(batches)
  traces, variances = {}, {}
  for name, s in slices.items():
    traces[name] = np.mean([np.trace(h[s, s]) for h in hessians])
    var = 0.0
    for h in hessians:
      block = h[s, s]
      rest = np.delete(h[s], np.arange(flat.size)[s], axis=1)
      var += 2 * (np.sum(block ** 2) - np.sum(np.diag(block) ** 2)) + np.sum(rest ** 2)
    variances[name] = var / n ** 2
  assert sum(sizes.values()) == flat.size
  return traces, variances


def test_estimate_within_its_statistical_error():
  x, batches = _problem()
  exact, variances = _exact(x, batches)
  probes, iterations = 64, 40
  estimate = hutchinson.estimator(_loss, probes=probes)
  out = estimate(jax.random.key(0), x, batches, 0.0, iterations)
  assert out.iterations == iterations and not out.converged
  for name in ("a", "b"):
    sigma = np.sqrt(variances[name] / (probes * iterations))
    got = float(out.traces[name])
    # 5 sigma: the mean of 2,560 independent samples per batch is close to normal.
    assert abs(got - exact[name]) < 5 * sigma, (name, got, exact[name], sigma)
    assert sigma < 0.05 * abs(exact[name])  # The test resolves the trace.
    # The reported standard error is the exact one (the sample variance of
    # 2,560 probes per batch is within a few percent of the true variance).
    assert out.standard_errors[name] == pytest.approx(sigma, rel=0.15), name


def test_tolerance_bounds_the_standard_error_and_stops_when_the_variance_says():
  x, batches = _problem()
  exact, variances = _exact(x, batches)
  probes, tol = 4, 0.05
  estimate = hutchinson.estimator(_loss, probes=probes)
  out = estimate(jax.random.key(1), x, batches, tol, 200)
  assert out.converged
  for name in ("a", "b"):
    assert out.standard_errors[name] <= tol * abs(out.traces[name])
  # Probes per batch the exact variance needs for a standard error of
  # tol * trace in the noisiest leaf; the estimate stops near there.
  needed = max(variances[n] / (tol * exact[n]) ** 2 for n in ("a", "b"))
  assert needed / probes > 5  # Not the first iteration: the rule is what stops it.
  assert 0.6 * needed <= out.iterations * probes <= 1.6 * needed, (out.iterations, needed)
  again = estimate(jax.random.key(1), x, batches, tol, 200)
  assert again == out
  other = estimate(jax.random.key(2), x, batches, tol, 200)
  assert other.traces != out.traces
  # A cap below what the tolerance needs ends the estimate unconverged.
  capped = estimate(jax.random.key(1), x, batches, tol, 2)
  assert capped.iterations == 2 and not capped.converged


def test_one_probe_per_batch_has_no_standard_error_until_the_second_iteration():
  x, batches = _problem()
  estimate = hutchinson.estimator(_loss, probes=1)
  first = estimate(jax.random.key(0), x, batches, 0.5, 1)
  assert np.isnan(first.standard_errors["a"]) and not first.converged
  second = estimate(jax.random.key(0), x, batches, 0.0, 2)
  assert np.isfinite(second.standard_errors["a"]) and not second.converged


def test_one_compilation_for_any_key_batch_tolerance_and_cap():
  x, batches = _problem()
  estimate = hutchinson.estimator(_loss, probes=4)
  for key, tol, cap in ((0, 0.0, 3), (1, 0.1, 5), (2, 0.01, 7)):
    estimate(jax.random.key(key), x, batches, tol, cap)
  assert estimate.step._cache_size() == 1  # pylint: disable=protected-access


def test_bad_probe_count_is_one_line():
  with pytest.raises(ValueError, match=r"probes=0; allowed: an integer >= 1"):
    hutchinson.estimator(_loss, probes=0)
