"""Bias correction: empirical (measured) and analytic (from BN statistics)."""

import jax
import numpy as np
import pytest
from scipy import integrate

from haqjax import models
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.ptq import bias_correction as bc
from haqjax.ptq import equalization as cle
from haqjax.ptq import folding
from ptq_testing import fit_bn_stats
from ptq_testing import random_variables as _random_variables


def random_variables(model, shape, seed=0):
  """Random gammas around e^-0.5, betas around 0.3 (statistics fitted later)."""
  return _random_variables(model, shape, lambda rng, c: {
      "scale": np.exp(rng.normal(-0.5, 0.5, c)), "bias": rng.normal(0.3, 0.5, c),
      "var": np.ones(c)}, seed)


def bn_output_error(model, reference, variables, x, policy, layer):
  """Mean over examples and positions of BN output (quantized - float), [C]."""
  @jax.jit
  def error(reference, variables, policy):
    def out(v, p):
      _, inter = model.apply(v, x, policy=p, capture_intermediates=True)
      return inter["intermediates"][f"{layer}_bn"]["__call__"][0]
    return (out(variables, policy) - out(reference, None)).mean(axis=(0, 1, 2))
  return np.asarray(error(reference, variables, policy))


@pytest.fixture(scope="module")
def quickstart():
  model = models.create("quickstart_cnn", num_classes=10, width_mult=0.5)
  shape = (28, 28, 1)
  x = jax.random.normal(jax.random.key(1), (8, *shape))
  variables = fit_bn_stats(model, random_variables(model, shape), x)
  names = layer_table(model, (1, *shape)).names
  return model, variables, folding.fold_batch_norms(model, variables), x, names


def test_clipped_normal_mean_matches_quadrature():
  for act, f in (("relu", lambda z: max(z, 0.0)), ("relu6", lambda z: min(max(z, 0.0), 6.0)),
                 ("linear", lambda z: z)):
    for mu, sigma in ((0.5, 1.0), (-1.0, 0.7), (5.0, 2.0)):
      pdf = lambda z: np.exp(-0.5 * ((z - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
      want = integrate.quad(lambda z: f(z) * pdf(z), mu - 12 * sigma, mu + 12 * sigma,
                            points=[0.0, 6.0], limit=200)[0]
      np.testing.assert_allclose(bc.clipped_normal_mean(mu, sigma, act), want,
                                 rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bc.clipped_normal_mean([-1.0, 7.0], 0.0, "relu6"), [0.0, 6.0])


def test_empirical_correction_zeroes_the_mean_error(quickstart):
  model, _, folded, x, names = quickstart
  batches = [x[:4], {"image": x[4:], "mask": np.ones(4, bool)}]
  for layer in ("conv3",):
    # Only `layer` is quantized (W4), so its input is the float model's.
    policy = Policy.create(names, [4 if n == layer else 32 for n in names], 32)
    before = bn_output_error(model, folded, folded, x, policy, layer)
    corrected = bc.empirical_bias_correction(model, folded, batches, policy)
    after = bn_output_error(model, folded, corrected, x, policy, layer)
    assert np.abs(before).max() > 1e-3
    np.testing.assert_allclose(after, 0.0, atol=1e-5 + 1e-3 * np.abs(before).max())
  # 'input' (DFQ's (W_q - W) E[x]) equals 'output' for a 1x1 stride-1 conv.
  policy = Policy.uniform(names, 4, 8)
  out = bc.expected_output_error(model, folded, [x], policy)
  inp = bc.expected_output_error(model, folded, [x], policy, mode="input")
  np.testing.assert_allclose(inp["conv3"], out["conv3"], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(inp["classifier"], out["classifier"], rtol=1e-3, atol=1e-6)
  assert set(out) == set(names)


def test_analytic_correction_reduces_the_mean_error(quickstart):
  model, variables, folded, x, names = quickstart
  pairs = cle.equalization_pairs(model)
  stats = folding.bn_output_stats(variables)
  for layer in ("conv2", "conv5"):
    policy = Policy.create(names, [4 if n == layer else 32 for n in names], 32)
    corrected = bc.analytic_bias_correction(model, folded, policy, pairs, stats)
    before = bn_output_error(model, folded, folded, x, policy, layer)
    after = bn_output_error(model, folded, corrected, x, policy, layer)
    ratio = np.linalg.norm(after) / np.linalg.norm(before)
    assert ratio < 0.5, (layer, ratio)


def test_errors(quickstart):
  model, variables, folded, x, names = quickstart
  policy = Policy.uniform(names, 4, 8)
  with pytest.raises(ValueError, match="mode is 'mean'"):
    bc.expected_output_error(model, folded, [x], policy, mode="mean")
  with pytest.raises(ValueError, match="calibration batches are empty"):
    bc.empirical_bias_correction(model, folded, [], policy)
  with pytest.raises(ValueError, match="act is 'gelu'"):
    bc.clipped_normal_mean(0.0, 1.0, "gelu")
  with pytest.raises(ValueError, match="bn_stats has no entry for layer 'stem'"):
    bc.analytic_bias_correction(model, folded, policy, cle.equalization_pairs(model), {})
