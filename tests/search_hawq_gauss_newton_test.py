"""Gauss-Newton traces against the exact Gauss-Newton matrix of small models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from haqjax import models
from haqjax.search.hawq import gauss_newton
from haqjax.search.hawq import measure
from haqjax.search.hawq import sensitivity
from haqjax.search.hawq.config import HawqConfig
from search_hawq_sensitivity_test import exact_hessian_blocks as exact_hessian
from search_hawq_sensitivity_test import tiny_problem


def _point(model, variables, batches):
  recorded = sensitivity.record(model, variables, batches)
  paths = {n: r["path"] for n, r in recorded.items()}
  size = batches[0]["label"].shape[0]
  x = {"kernel": {n: variables["params"][n]["kernel"] for n in paths},
       "input": {n: jnp.zeros((size, *recorded[n]["inputs"].shape[1:])) for n in paths}}
  return x, paths


def _exact(model, variables, batches):
  """Per `(role, layer)`: the exact block trace of the mean Gauss-Newton matrix,
  and the variance of one probe's sample (mean over the batches)."""
  x, paths = _point(model, variables, batches)
  logits_fn = sensitivity.layer_loss(model, variables, paths, criterion=lambda z, y: z)
  flat, unravel = ravel_pytree(x)
  leaves, treedef = jax.tree.flatten(x)
  offsets = np.cumsum([0] + [l.size for l in leaves])
  slots = treedef.unflatten([slice(a, b) for a, b in zip(offsets[:-1], offsets[1:])])
  out = {(role, n): [0.0, 0.0] for role in ("kernel", "input") for n in paths}
  for batch in batches:
    z = np.asarray(logits_fn(x, batch), np.float64)  # [B, C]
    b, c = z.shape
    jac = np.asarray(jax.jacobian(lambda f: logits_fn(unravel(f), batch).reshape(-1))(flat),
                     np.float64)  # [B * C, D]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    root = np.zeros((b * c, b * c))  # S, S S^T = H_z
    for n in range(b):
      s = (np.diag(np.sqrt(p[n])) - np.outer(p[n], np.sqrt(p[n]))) / np.sqrt(b)
      root[n * c:(n + 1) * c, n * c:(n + 1) * c] = s
    for (role, name), acc in out.items():
      js = jac[:, slots[role][name]]
      m = root.T @ js @ js.T @ root  # a sample is r^T M r, r Rademacher
      acc[0] += np.trace(m) / len(batches)
      acc[1] += 2 * (np.sum(m ** 2) - np.sum(np.diag(m) ** 2)) / len(batches) ** 2
  return out


def test_traces_match_the_exact_gauss_newton_matrix():
  model, variables, batches = tiny_problem()
  exact = _exact(model, variables, batches)
  probes, iterations = 64, 50
  traces = sensitivity.hessian_traces(jax.random.key(0), model, variables, batches,
                                      probes=probes, tol=0.0, max_iterations=iterations,
                                      curvature="gauss_newton")
  assert traces.curvature == "gauss_newton" and traces.probes == probes * iterations
  for role, got in (("kernel", traces.weight), ("input", traces.activation)):
    for i, name in enumerate(traces.names):
      trace, var = exact[role, name]
      sigma = np.sqrt(var / (probes * iterations))
      assert abs(got[i] - trace) < 5 * sigma, (role, name, got[i], trace, sigma)
      assert sigma < 0.05 * trace  # The comparison resolves each trace.
      error = (traces.weight_error if role == "kernel" else traces.activation_error)[i]
      assert error == pytest.approx(sigma, rel=0.15), (role, name)  # Its standard error.
  # The logits are linear in the last layer's kernel and input: there the
  # Gauss-Newton block is the Hessian block.
  hessian = exact_hessian(model, variables, batches)
  for role in ("kernel", "input"):
    assert exact[role, "fc2"][0] == pytest.approx(hessian[role, "fc2"][0], rel=1e-6)
  # Before it, the sine's curvature makes them differ.
  assert exact["kernel", "fc1"][0] != pytest.approx(hessian["kernel", "fc1"][0], rel=1e-2)


def test_samples_are_never_negative_and_vary_less_than_hutchinsons():
  model, variables, batches = tiny_problem()
  exact = _exact(model, variables, batches)
  hessian = exact_hessian(model, variables, batches)
  for key in exact:
    assert exact[key][1] < hessian[key][1], key  # Per-probe variance.
  x, paths = _point(model, variables, batches)
  logits_fn = sensitivity.layer_loss(model, variables, paths, criterion=lambda z, y: z)
  step = gauss_newton.estimator(logits_fn, probes=4).step
  for i in range(5):
    sample = step(jax.random.key(i), x, batches[i % 2])
    assert all(np.shape(v) == (4,) and np.all(np.asarray(v) >= 0)
               for v in jax.tree.leaves(sample))


def test_output_probes_have_the_cross_entropy_hessian_as_covariance():
  z = jax.random.normal(jax.random.key(0), (3, 4)) * 2
  u = np.asarray(gauss_newton.output_probes(jax.random.key(1), z, 40000), np.float64)
  cov = np.einsum("pbc,pbd->bcd", u, u) / u.shape[0]
  p = np.asarray(jax.nn.softmax(z), np.float64)
  want = (np.einsum("bc,cd->bcd", p, np.eye(4)) - np.einsum("bc,bd->bcd", p, p)) / 3
  np.testing.assert_allclose(cov, want, atol=3e-3)
  np.testing.assert_allclose(u.sum(-1), 0, atol=1e-5)  # p^T S = 0: logit shifts are free.


def test_model_pass_records_the_curvature():
  model = models.create("digits_cnn", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  key = jax.random.key(1)
  batches = [{"image": jax.random.normal(key, (16, 8, 8, 1)), "label": jnp.arange(16) % 10}]
  result = measure.sensitivity_pass(key, model, variables, batches, w_bits=(4, 8),
                                    a_bits=(4, 8), probes=4, tol=0.0, max_iterations=2,
                                    curvature="gauss_newton")
  t = result.traces
  assert t.curvature == "gauss_newton" and t.iterations == 2
  assert np.all(t.weight > 0) and np.all(t.activation > 0)
  again = measure.Sensitivity.from_dict(result.to_dict())
  assert again.traces.curvature == "gauss_newton"
  np.testing.assert_array_equal(again.traces.weight, t.weight)


def test_bad_curvature_is_one_line():
  model, variables, batches = tiny_problem()
  with pytest.raises(ValueError, match=r"^curvature='fisher'; allowed: hessian, gauss_newton$"):
    sensitivity.hessian_traces(jax.random.key(0), model, variables, batches, probes=1,
                               tol=0.1, max_iterations=1, curvature="fisher")
  with pytest.raises(ValueError, match=r"^hawq_curvature='fisher' is not allowed; allowed: "
                                       r"hessian, gauss_newton$"):
    HawqConfig(hawq_curvature="fisher")
