"""Hutchinson's estimator of Hessian traces, one per leaf of a pytree.

For a loss `f(x, batch)` over a pytree `x`, `estimator(f, probes=P)` returns
a jitted function that estimates, for every leaf `x_l`, the trace of the
diagonal Hessian block `Tr(d^2 f / dx_l^2)` of the loss averaged over a
stack of batches:

    Tr(H_ll) = E_v[v_l . (H v)_l],   v Rademacher (+-1) over all of x.

One probe `v` covers every leaf at once (PyHessian's and HAWQ-V2's choice):
the cross blocks `H_lk` (k != l) add `||H_l,rest||_F^2` to the variance of
leaf l's estimate but not to its mean, and the cost is one Hessian-vector
product per probe instead of one per leaf. The Hessian-vector product is
forward-over-reverse (`jax.jvp` of `jax.grad`); an iteration draws `P`
probes per batch, batched with `jax.vmap`, and runs them on every batch
(`lax.scan`). The running mean over iterations stops when no leaf's mean
moved by more than `tol` relative to its value, or after `max_iterations`;
both are arrays, so changing them does not recompile.

Keys: iteration `i` on batch `j` draws from `fold_in(fold_in(key, i), j)`,
so no probe is drawn twice and a run is reproducible from its key.

Example::

    estimate = estimator(loss_fn, probes=8)
    out = estimate(key, x, stacked_batches, 1e-3, 50)
    out.traces  # like x, a scalar per leaf

References:
  Hutchinson. A stochastic estimator of the trace of the influence matrix
  for Laplacian smoothing splines. 1990.
  Avron & Toledo. Randomized algorithms for estimating the trace of an
  implicit symmetric positive semi-definite matrix. J. ACM 2011.
  Yao et al. PyHessian: Neural Networks Through the Lens of the Hessian.
  2020. https://arxiv.org/abs/1912.07145
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from haqjax.typing import Array
from haqjax.typing import ArrayLike
from haqjax.typing import PRNGKey
from haqjax.typing import PyTree

LossFn = Callable[[PyTree, PyTree], Array]
# Added to the denominator of the relative change, so a trace of exactly 0
# does not divide by 0 (it then never converges; the cap ends the loop).
_TINY = 1e-30


class Estimate(NamedTuple):
  """What `estimator`'s function returns.

  Attributes:
    traces: like `x`, each leaf's estimated Hessian-block trace (float32 scalar).
    iterations: iterations run (each `probes` probes on every batch).
    converged: whether the last iteration moved every trace by less than `tol`.
  """
  traces: PyTree
  iterations: Array
  converged: Array


def rademacher_like(key: PRNGKey, x: PyTree, count: int) -> PyTree:
  """`count` +-1 probes shaped like `x`: leaves `[count, *leaf.shape]`.

  One draw of `[count, size of x]` split into the leaves: drawing per leaf
  (or per probe under `vmap`) gave XLA:CPU one random-bits computation per
  leaf and probe to compile, ten times slower to compile for a small CNN.
  """
  flat, unravel = ravel_pytree(x)
  v = jax.random.rademacher(key, (count, flat.size), flat.dtype)
  return jax.vmap(unravel)(v)


def quadratic_forms(loss_fn: LossFn, x: PyTree, batch: PyTree, v: PyTree) -> PyTree:
  """Per leaf `v_l . (H v)_l`: H the Hessian of `loss_fn(., batch)` at `x`."""
  _, hv = jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (x,), (v,))
  return jax.tree.map(lambda a, b: jnp.vdot(a, b).astype(jnp.float32), v, hv)


def estimator(loss_fn: LossFn, *, probes: int
              ) -> Callable[[PRNGKey, PyTree, PyTree, ArrayLike, ArrayLike], Estimate]:
  """A jitted `estimate(key, x, batches, tol, max_iterations) -> Estimate`.

  Args:
    loss_fn: `loss_fn(x, batch) -> scalar`, twice differentiable in `x`.
    probes: probes per iteration and batch, evaluated together by `vmap`
      (memory grows with it: one forward-over-reverse pass per probe).

  Returns:
    The estimator. Its `batches` is a pytree whose leaves stack the batches
    on a leading axis `[N, ...]`; the traces are those of the Hessian of the
    mean loss over the N batches. `tol` >= 0 is the relative change of every
    running mean that ends the loop (0: run `max_iterations`);
    `max_iterations` >= 1 caps it.

  Raises:
    ValueError: `probes` < 1.
  """
  if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
    raise ValueError(f"probes={probes!r}; allowed: an integer >= 1")

  def one_iteration(key: PRNGKey, x: PyTree, batches: PyTree) -> PyTree:
    """Mean over the batches and this iteration's probes of `v_l . (H v)_l`."""
    def per_batch(carry, inputs):
      index, batch = inputs
      vs = rademacher_like(jax.random.fold_in(key, index), x, probes)  # leaves [P, ...]
      forms = jax.vmap(lambda v: quadratic_forms(loss_fn, x, batch, v))(vs)  # [P]
      return jax.tree.map(lambda c, f: c + jnp.mean(f), carry, forms), None

    count = jax.tree.leaves(batches)[0].shape[0]
    zeros = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), x)
    total, _ = jax.lax.scan(per_batch, zeros, (jnp.arange(count), batches))
    return jax.tree.map(lambda t: t / count, total)

  @jax.jit
  def estimate(key: PRNGKey, x: PyTree, batches: PyTree, tol: ArrayLike,
               max_iterations: ArrayLike) -> Estimate:
    tol = jnp.asarray(tol, jnp.float32)
    max_iterations = jnp.asarray(max_iterations, jnp.int32)

    def cond(state):
      i, _, converged = state
      return (i < max_iterations) & ~converged

    def body(state):
      i, mean, _ = state
      sample = one_iteration(jax.random.fold_in(key, i), x, batches)
      n = i.astype(jnp.float32)
      new = jax.tree.map(lambda m, s: (m * n + s) / (n + 1), mean, sample)
      change = jax.tree.map(lambda a, b: jnp.abs(a - b) / (jnp.abs(a) + _TINY), new, mean)
      worst = jnp.max(jnp.stack(jax.tree.leaves(change)))
      return i + 1, new, (i > 0) & (worst < tol)

    zeros = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), x)
    i, mean, converged = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), zeros, jnp.bool_(False)))
    return Estimate(traces=mean, iterations=i, converged=converged)

  return estimate


def stack_batches(batches: list[PyTree]) -> PyTree:
  """Batches of one shape stacked on a new leading axis, as `estimator` takes them."""
  if not batches:
    raise ValueError("no batches; allowed: at least one batch")
  return jax.tree.map(lambda *b: jnp.stack(b), *batches)
