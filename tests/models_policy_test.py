"""Tests that zoo models take their bits at call time: one compile for every
policy, vmap over policies, float policies equal no policy, and every layer
reads its own entry."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.nn import layer_table
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy

SMALL = [("digits_cnn", {}), ("quickstart_cnn", {}), ("resnet_small", dict(depth=8))]


@functools.lru_cache(maxsize=None)
def _setup(name, **kwargs):
  """(model, variables, a batch of 4 inputs, layer names)."""
  model = models.create(name, num_classes=10, **kwargs)
  x = jax.random.normal(jax.random.key(0), (4, *models.INPUT_SHAPES[name]))
  variables = model.init(jax.random.key(1), x)
  return model, variables, x, layer_table(model, x.shape).names


def _random_policy(rng, names, shape=()):
  size = (*shape, len(names))
  return Policy.create(names, rng.integers(1, 9, size), rng.integers(1, 9, size))


@pytest.mark.parametrize("name, kwargs", SMALL)
def test_policy_changes_never_retrace(name, kwargs):
  model, variables, x, names = _setup(name, **kwargs)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def apply(variables, x, policy):
    return model.apply(variables, x, policy)

  rng = np.random.default_rng(0)
  outs = [apply(variables, x, _random_policy(rng, names)) for _ in range(20)]
  assert len({float(o.sum()) for o in outs}) > 1
  chex.clear_trace_counter()


@pytest.mark.parametrize("name, kwargs", SMALL)
def test_vmap_over_policies_equals_loop(name, kwargs):
  model, variables, x, names = _setup(name, **kwargs)
  rng = np.random.default_rng(3)
  stacked = _random_policy(rng, names, shape=(5,))  # w_bits, a_bits: [5, L]
  apply = jax.jit(lambda p: model.apply(variables, x, p))
  batched = jax.jit(jax.vmap(apply))(stacked)
  assert batched.shape == (5, 4, 10)
  for k in range(5):
    one = Policy.create(names, stacked.w_bits[k], stacked.a_bits[k])
    np.testing.assert_allclose(batched[k], apply(one), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", SMALL)
def test_float_policy_equals_none_and_low_bits_differ(name, kwargs):
  model, variables, x, names = _setup(name, **kwargs)
  ref = model.apply(variables, x)
  np.testing.assert_array_equal(
      model.apply(variables, x, Policy.uniform(names, FLOAT_BITS, FLOAT_BITS)), ref)
  w8a8 = model.apply(variables, x, Policy.uniform(names, 8, 8))
  w2a2 = model.apply(variables, x, Policy.uniform(names, 2, 2))
  err8, err2 = float(jnp.abs(w8a8 - ref).max()), float(jnp.abs(w2a2 - ref).max())
  assert 0 < err8 < err2


@pytest.mark.parametrize("name, kwargs", SMALL + [
    ("mobilenet_v2_small", dict(width_mult=0.35))])
def test_every_layer_reads_its_own_bits(name, kwargs):
  """Lowering one layer's weight (or input) bits changes the output."""
  model, variables, x, names = _setup(name, **kwargs)
  apply = jax.jit(lambda p: model.apply(variables, x, p))
  ref = apply(Policy.uniform(names, FLOAT_BITS, FLOAT_BITS))
  for role in ("w_bits", "a_bits"):
    bits = np.full((len(names), len(names)), FLOAT_BITS)
    np.fill_diagonal(bits, 2)  # Row i: layer i at 2 bits, the rest float.
    other = np.full_like(bits, FLOAT_BITS)
    w, a = (bits, other) if role == "w_bits" else (other, bits)
    outs = jax.vmap(apply)(Policy.create(names, w, a))  # [L, 4, 10]
    diffs = np.abs(np.asarray(outs) - np.asarray(ref)).max(axis=(1, 2))
    assert np.all(diffs > 0), [n for n, d in zip(names, diffs) if d == 0]


def test_policy_of_another_model_is_an_error():
  model, variables, x, _ = _setup("digits_cnn")
  other = _setup("quickstart_cnn")[3]
  with pytest.raises(ValueError, match="layer 'stem' is not in the policy"):
    model.apply(variables, x, Policy.uniform(other[1:], 8, 8))
