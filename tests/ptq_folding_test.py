"""BatchNorm folding of variables: same logits, identity BNs, BN statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.nn import layer_table
from haqjax.nn.bn_folding import BN_EPSILON
from haqjax.policy import Policy
from haqjax.ptq import folding
from ptq_testing import random_variables as _random_variables


def random_variables(model, shape, seed=0):
  """BN gammas of both signs; running statistics far from (0, 1)."""
  return _random_variables(model, shape, lambda rng, c: {
      "scale": rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c, p=[.1, .9]),
      "bias": rng.normal(0, 0.5, c), "mean": rng.normal(0, 0.3, c),
      "var": rng.uniform(0.5, 2.0, c)}, seed)


def _model(name):
  if name == "quickstart_cnn":
    return models.create(name, num_classes=10), (28, 28, 1)
  return models.create(name, num_classes=10, width_mult=0.35), (32, 32, 3)


@pytest.mark.parametrize("name", ["quickstart_cnn", "mobilenet_v2_small"])
def test_folded_logits_equal_unfolded(name):
  model, shape = _model(name)
  x = jax.random.normal(jax.random.key(1), (4, *shape))
  variables = random_variables(model, shape)
  folded = folding.fold_batch_norms(model, variables)
  assert jax.tree.structure(folded) == jax.tree.structure(variables)
  apply = jax.jit(model.apply)
  ref = apply(variables, x)
  out = apply(folded, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
  pairs = folding.bn_pairs(variables)
  assert len(pairs) == len(layer_table(model, (1, *shape)).names) - 1  # no classifier BN
  for pair in pairs:
    assert folding.is_folded(folded, pair)
    assert not folding.is_folded(variables, pair)
  # Inputs untouched; folding is idempotent.
  assert not folding.is_folded(variables, pairs[0])
  again = folding.fold_batch_norms(model, folded)
  jax.tree.map(np.testing.assert_array_equal, again, folded)


def test_weight_quantizer_sees_the_folded_kernel():
  model, shape = _model("quickstart_cnn")
  x = jax.random.normal(jax.random.key(1), (2, *shape))
  variables = random_variables(model, shape, seed=3)
  folded = folding.fold_batch_norms(model, variables)
  st = variables["batch_stats"]["conv1_bn"]
  bn = variables["params"]["conv1_bn"]
  expected = variables["params"]["conv1"]["kernel"] * bn["scale"] / jnp.sqrt(
      st["var"] + BN_EPSILON)
  np.testing.assert_allclose(folded["params"]["conv1"]["kernel"], expected, rtol=1e-6)
  policy = Policy.uniform(layer_table(model, (1, *shape)).names, 8, 32)
  apply = jax.jit(model.apply)
  ref = apply(variables, x)
  q = apply(folded, x, policy=policy)
  assert float(jnp.abs(q - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_identity_variance_and_errors():
  v = folding.identity_variance(BN_EPSILON)
  assert float(jax.lax.rsqrt(v + BN_EPSILON)) == 1.0
  with pytest.raises(ValueError, match="eps is 0"):
    folding.identity_variance(0)
  with pytest.raises(ValueError, match="no 'batch_stats' collection"):
    folding.fold_batch_norms(None, {"params": {}})
  model, shape = _model("quickstart_cnn")
  variables = random_variables(model, shape)
  with pytest.raises(ValueError, match="has a folded BN"):
    folding.bn_output_stats(folding.fold_batch_norms(model, variables))
  stats = folding.bn_output_stats(variables)
  assert set(stats) == {n for n, *_ in models.cnn.QUICKSTART_LAYERS}
