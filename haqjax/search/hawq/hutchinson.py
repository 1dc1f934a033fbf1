"""Hutchinson's estimator of Hessian traces, one per leaf of a pytree.

For a loss `f(x, batch)` over a pytree `x`, `estimator(f, probes=P)` returns
an `Estimator` that estimates, for every leaf `x_l`, the trace of the
diagonal Hessian block `Tr(d^2 f / dx_l^2)` of the loss averaged over a
few batches:

    Tr(H_ll) = E_v[v_l . (H v)_l],   v Rademacher (+-1) over all of x.

One probe `v` covers every leaf at once (PyHessian's and HAWQ-V2's choice):
the cross blocks `H_lk` (k != l) add `||H_l,rest||_F^2` to the variance of
leaf l's estimate but not to its mean, and the cost is one Hessian-vector
product per probe instead of one per leaf. The Hessian-vector product is
forward-over-reverse (`jax.jvp` of `jax.grad`); an iteration draws `P`
probes per batch, batched with `jax.vmap` in one jitted step, on every
batch. The running mean over iterations stops when no leaf's mean moved
by more than `tol` relative to its value, or after `max_iterations`;
neither is part of the compiled step.

Keys: iteration `i` on batch `j` draws from `fold_in(fold_in(key, i), j)`,
so no probe is drawn twice and a run is reproducible from its key.

Example::

    estimate = estimator(loss_fn, probes=8)
    out = estimate(key, x, batches, tol=1e-3, max_iterations=50)
    out.traces  # like x, a float per leaf

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
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np

from haqjax.typing import Array
from haqjax.typing import PRNGKey
from haqjax.typing import PyTree

LossFn = Callable[[PyTree, PyTree], Array]
# Added to the denominator of the relative change, so a trace of exactly 0
# does not divide by 0 (it then never converges; the cap ends the loop).
_TINY = 1e-30


class Estimate(NamedTuple):
  """What an `Estimator` returns.

  Attributes:
    traces: like `x`, each leaf's estimated Hessian-block trace (a float).
    iterations: iterations run (each `probes` probes on every batch).
    converged: whether the last iteration moved every trace by less than `tol`.
  """
  traces: PyTree
  iterations: int
  converged: bool


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


def estimator(loss_fn: LossFn, *, probes: int) -> Estimator:
  """The estimator of `loss_fn`'s Hessian-block traces (see `Estimator`).

  Args:
    loss_fn: `loss_fn(x, batch) -> scalar`, twice differentiable in `x`.
    probes: probes per iteration and batch, evaluated together by `vmap`
      (memory grows with it: one forward-over-reverse pass per probe).

  Raises:
    ValueError: `probes` < 1.
  """
  check_probes(probes)

  def step(key: PRNGKey, x: PyTree, batch: PyTree) -> PyTree:
    vs = rademacher_like(key, x, probes)  # leaves [P, ...]
    forms = jax.vmap(lambda v: quadratic_forms(loss_fn, x, batch, v))(vs)  # [P]
    return jax.tree.map(jnp.mean, forms)

  return Estimator(step, probes)


def check_probes(probes: int) -> None:
  """Raises ValueError unless `probes` is an integer >= 1."""
  if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
    raise ValueError(f"probes={probes!r}; allowed: an integer >= 1")


class Estimator:
  """`estimate(key, x, batches, tol, max_iterations) -> Estimate`.

  One jitted, pure step (`step(key, x, batch)`: per leaf, the mean of one
  trace sample over `probes` vmapped probes on one batch; here
  `v_l . (H v)_l`, or another estimator's, `haqjax.search.hawq.gauss_newton`)
  is compiled once per shapes, for any key, batch, tolerance and cap; the
  iterations and batches loop in Python. A `lax.scan` or `while_loop`
  around the step would keep it on the device, but XLA:CPU runs the
  convolutions of a loop body about ten times slower than at top level
  (measured: 4.5 s against 0.5 s for a quickstart CNN Hessian-vector
  product on 128 images), and one step per call costs one host transfer of
  a few scalars.

  Attributes:
    probes: probes per iteration and batch.
    step: the jitted step.
  """

  def __init__(self, step: Callable[[PRNGKey, PyTree, PyTree], PyTree], probes: int):
    self.probes = probes
    self.step = jax.jit(step)

  def __call__(self, key: PRNGKey, x: PyTree, batches: Sequence[PyTree], tol: float,
               max_iterations: int) -> Estimate:
    """The traces of the Hessian of the mean loss over `batches`.

    Args:
      key: iteration `i` on batch `j` draws from `fold_in(fold_in(key, i), j)`.
      x: the point (a pytree of float arrays).
      batches: the batches (any pytrees `loss_fn` takes; one shape, one compile).
      tol: the relative change of every running mean that ends the loop
        (0: run `max_iterations`).
      max_iterations: the cap, >= 1.
    """
    batches = list(batches)
    if not batches:
      raise ValueError("no batches; allowed: at least one batch")
    leaves, treedef = jax.tree.flatten(x)
    mean = np.zeros(len(leaves))
    converged = False
    i = 0
    while i < max_iterations and not converged:
      ikey = jax.random.fold_in(key, i)
      sums = [self.step(jax.random.fold_in(ikey, j), x, b) for j, b in enumerate(batches)]
      sample = np.mean([jax.tree.leaves(jax.device_get(s)) for s in sums], axis=0)
      new = (mean * i + sample) / (i + 1)
      change = np.max(np.abs(new - mean) / (np.abs(new) + _TINY))
      converged = bool(i > 0 and change < tol)
      mean, i = new, i + 1
    return Estimate(traces=treedef.unflatten([float(m) for m in mean]), iterations=i,
                    converged=converged)


