"""Tests that run the small zoo models: shapes, BatchNorm, dtype, and bits at
call time (one compile for every policy, vmap over policies, float policies
equal no policy, every layer reads its own entry)."""

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


def _variables(model, x, seed=0):
  """He-normal kernels and identity BatchNorm, without compiling `model.init`.

  `jax.jit(model.init)` of a 53-layer MobileNet takes ~15 s to compile on a
  CPU; filling the traced shapes takes ~1 s.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _setup(name, **kwargs):
  """(model, variables, a batch of 4 inputs, layer names)."""
  model = models.create(name, num_classes=10, **kwargs)
  x = jax.random.normal(jax.random.key(0), (4, *models.INPUT_SHAPES[name]))
  return model, _variables(model, x), x, layer_table(model, x.shape).names


def _random_policy(rng, names, shape=()):
  size = (*shape, len(names))
  return Policy.create(names, rng.integers(1, 9, size), rng.integers(1, 9, size))


@pytest.mark.parametrize("name, shape, kwargs", [
    ("digits_cnn", (2, 8, 8, 1), {}),
    ("quickstart_cnn", (2, 28, 28, 1), {}),
    ("mobilenet_v2_small", (2, 32, 32, 3), dict(width_mult=0.35)),
    ("resnet_small", (2, 28, 28, 1), dict(depth=8)),
    ("resnet20", (2, 32, 32, 3), {}),
])
def test_small_models_run_and_train_mode_updates_bn(name, shape, kwargs):
  model = models.create(name, num_classes=7, **kwargs)
  x = jax.random.normal(jax.random.key(0), shape)
  variables = _variables(model, x)

  @jax.jit
  def run(variables, x):
    logits = model.apply(variables, x)
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, out, updates

  logits, out, updates = run(variables, x)
  assert logits.shape == (shape[0], 7) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert out.shape == (shape[0], 7)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_init_makes_params_and_batch_stats():
  model = models.create("digits_cnn", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"stem", "stem_bn", "conv1", "conv1_bn",
                                      "classifier"}
  assert set(variables["batch_stats"]["stem_bn"]) == {"mean", "var"}


def test_bfloat16_computation_keeps_float32_params_and_logits():
  model, variables, x, _ = _setup("quickstart_cnn")
  bf16 = models.create("quickstart_cnn", num_classes=10, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(jax.eval_shape(bf16.init, jax.random.key(0), x)))
  logits = jax.jit(bf16.apply)(variables, x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, jax.jit(model.apply)(variables, x),
                             atol=0.1, rtol=0.1)


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
def test_vmap_over_one_layer_policies_equals_loop(name, kwargs):
  """Row i of the stack quantizes only layer i; vmap gives each row its output."""
  model, variables, x, names = _setup(name, **kwargs)
  bits = np.full((len(names), len(names)), FLOAT_BITS)
  np.fill_diagonal(bits, 4)
  stacked = Policy.create(names, bits, bits)  # w_bits, a_bits: [L, L]
  apply = jax.jit(lambda p: model.apply(variables, x, p))
  batched = jax.jit(jax.vmap(apply))(stacked)  # [L, 4, 10]
  for k in range(len(names)):
    one = Policy.create(names, bits[k], bits[k])
    np.testing.assert_allclose(batched[k], apply(one), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", SMALL)
def test_vmap_over_mixed_policies_equals_loop(name, kwargs):
  """Random mixed bits: no cross-talk between rows, and the loop's results.

  vmap batches the convolutions, which changes the float summation order by an
  ulp; a value on a rounding boundary then moves by one quantization step, and
  through several quantized layers such steps add up. So the loop is matched
  to a tolerance, while rows of one vmapped call are checked exactly: row k is
  the same whatever the other rows hold.
  """
  model, variables, x, names = _setup(name, **kwargs)
  stacked = _random_policy(np.random.default_rng(3), names, shape=(5,))
  apply = jax.jit(lambda p: model.apply(variables, x, p))
  vapply = jax.jit(jax.vmap(apply))
  batched = np.asarray(vapply(stacked))  # [5, 4, 10]
  scale = float(np.abs(batched).max())
  for k in range(5):
    repeated = jax.tree.map(lambda b: jnp.repeat(b[k:k + 1], 5, axis=0), stacked)
    np.testing.assert_array_equal(vapply(repeated)[0], batched[k])
    one = Policy.create(names, stacked.w_bits[k], stacked.a_bits[k])
    np.testing.assert_allclose(batched[k], apply(one), atol=0.1 * scale)


@pytest.mark.parametrize("name, kwargs", SMALL)
def test_float_policy_equals_none_and_low_bits_differ(name, kwargs):
  model, variables, x, names = _setup(name, **kwargs)
  apply = jax.jit(lambda p: model.apply(variables, x, p))
  ref = apply(None)
  # Equal up to float rounding: the two programs fuse differently.
  np.testing.assert_allclose(apply(Policy.uniform(names, FLOAT_BITS, FLOAT_BITS)),
                             ref, rtol=0, atol=1e-6 * float(jnp.abs(ref).max()))
  err8 = float(jnp.abs(apply(Policy.uniform(names, 8, 8)) - ref).max())
  err2 = float(jnp.abs(apply(Policy.uniform(names, 2, 2)) - ref).max())
  assert 0 < err8 < err2


@pytest.mark.parametrize("name, kwargs", SMALL)
def test_every_layer_reads_its_own_bits(name, kwargs):
  """Lowering one layer's weight (or input) bits changes the output."""
  model, variables, x, names = _setup(name, **kwargs)
  apply = jax.jit(lambda p: model.apply(variables, x, p))
  ref = np.asarray(apply(None))
  silent = []
  for i, layer in enumerate(names):
    for role in ("w_bits", "a_bits"):
      bits = {"w_bits": np.full(len(names), FLOAT_BITS),
              "a_bits": np.full(len(names), FLOAT_BITS)}
      bits[role][i] = 2
      if np.array_equal(apply(Policy.create(names, **bits)), ref):
        silent.append(f"{layer}: {role}")
  assert not silent


def test_policy_of_another_model_is_an_error():
  model, variables, x, _ = _setup("digits_cnn")
  other = _setup("quickstart_cnn")[3]
  with pytest.raises(ValueError, match="layer 'stem' is not in the policy"):
    model.apply(variables, x, Policy.uniform(other[1:], 8, 8))
