"""The search step's batch-invariant pieces: same values as their models, same bits under vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from haqjax import hardware
from haqjax.search.gumbel import batch_invariant

L, K = 5, 6


def _draws(seed, batch=()):
  rng = np.random.default_rng(seed)
  tensor = jnp.asarray(rng.uniform(1e-6, 1e-3, (L, K, K)), jnp.float32)
  w, a = (jax.nn.softmax(jnp.asarray(rng.normal(0, 2, (*batch, L, K)), jnp.float32))
          for _ in range(2))
  return tensor, w, a


def test_mixture_cost_is_the_expected_cost():
  for seed in range(5):
    tensor, w, a = _draws(seed)
    np.testing.assert_allclose(batch_invariant.mixture_cost(tensor, w, a),
                               hardware.expected_from_tensor(tensor, w, a), rtol=1e-6)
  # One-hot mixtures: the sum of the chosen entries.
  tensor, _, _ = _draws(0)
  wi, ai = np.arange(L) % K, (np.arange(L) + 2) % K
  got = batch_invariant.mixture_cost(tensor, jax.nn.one_hot(wi, K), jax.nn.one_hot(ai, K))
  np.testing.assert_allclose(got, np.sum(np.asarray(tensor)[np.arange(L), wi, ai]),
                             rtol=1e-6)


def test_mixture_cost_and_its_gradient_are_the_same_bits_under_vmap():
  """`jnp.einsum`'s contraction (`expected_from_tensor`) fails this on XLA:CPU."""

  def penalty(w, a, tensor, multiplier, limit):
    return multiplier * (batch_invariant.mixture_cost(tensor, w, a) / limit - 1.0)

  value_and_grad = jax.value_and_grad(penalty, argnums=(0, 1))
  single = jax.jit(value_and_grad)
  batched = jax.jit(jax.vmap(value_and_grad, in_axes=(0, 0, None, 0, 0)))
  for seed in range(10):
    tensor, w, a = _draws(seed, batch=(2,))
    multiplier = jnp.asarray([0.5, 2.0], jnp.float32)
    limit = jnp.asarray([3e-3, 1e-3], jnp.float32)
    got = batched(w, a, tensor, multiplier, limit)
    for i in range(2):
      want = single(w[i], a[i], tensor, multiplier[i], limit[i])
      jax.tree.map(lambda g, x: np.testing.assert_array_equal(g[i], x), got, want)


def test_scale_by_adam_is_optax_adam():
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((L, K)), "a": jnp.zeros((L, K))}
  ours, theirs = batch_invariant.scale_by_adam(), optax.scale_by_adam()
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  assert type(s_ours) is type(s_theirs)  # pylint: disable=unidiomatic-typecheck
  jax.tree.map(np.testing.assert_array_equal, s_ours, s_theirs)
  for _ in range(5):
    grads = {k: jnp.asarray(rng.normal(0, 1e-3, (L, K)), jnp.float32) for k in params}
    u_ours, s_ours = jax.jit(ours.update)(grads, s_ours)
    u_theirs, s_theirs = jax.jit(theirs.update)(grads, s_theirs)
    # The moments are computed alike; the updates differ by the rounding of
    # a multiplication by 1 / (1 - b^t) against a division by (1 - b^t).
    jax.tree.map(np.testing.assert_array_equal, s_ours, s_theirs)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u_ours,
                 u_theirs)
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(u_ours)) > 0.1
