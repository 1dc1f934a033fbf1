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
batch. The estimate stops once every leaf's standard error is at most
`tol` times its trace, or after `max_iterations`; neither is part of the
compiled step.

Stopping rule. Every probe is a sample, so the samples' spread gives each
trace's standard error as it goes: with `n` probes on each of the `N`
batches and `s_j^2` the sample variance of the probes on batch `j`,
`se = sqrt(sum_j s_j^2 / n) / N` (the batches are strata of the mean).
`tol=0.1` asks for every trace to one part in ten at one standard error,
which is what an allocation comparing layers' sensitivities (often orders
of magnitude apart) needs, whatever the per-probe variance of the
curvature at hand; PyHessian's rule (stop when no running mean moves by
more than `tol` in an iteration) ends a low-variance estimate late and a
high-variance one by chance. The variance estimate needs at least two
probes per batch.

Keys: iteration `i` on batch `j` draws from `fold_in(fold_in(key, i), j)`,
so no probe is drawn twice and a run is reproducible from its key.

Example::

    estimate = estimator(loss_fn, probes=8)
    out = estimate(key, x, batches, tol=0.1, max_iterations=50)
    out.traces  # like x, a float per leaf
    out.standard_errors  # like x

Per channel (`channels=True`): each leaf's trace is also split over its
last axis (a kernel's output channels, an input's channels), the sum over
the leaf's elements of that channel of the same per-probe sample, so the
channel traces add up to the leaf's trace probe by probe. The stopping rule
stays on the leaves' traces.

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


class Estimate(NamedTuple):
  """What an `Estimator` returns.

  Attributes:
    traces: like `x`, each leaf's estimated Hessian-block trace (a float).
    iterations: iterations run (each `probes` probes on every batch).
    converged: whether every standard error is at most `tol` times its trace.
    standard_errors: like `x`, each trace's standard error (see the module
      doc; `nan` from a single probe per batch).
    channel_traces: like `x`, each leaf's trace per channel (`[C]`, its
      last axis; `[1]` for a leaf of fewer than 2 axes), or None (not
      estimated per channel).
  """
  traces: PyTree
  iterations: int
  converged: bool
  standard_errors: PyTree = None
  channel_traces: PyTree = None


def channel_count(shape: tuple[int, ...]) -> int:
  """The channels of a leaf of `shape`: its last axis, or 1 below 2 axes."""
  return int(shape[-1]) if len(shape) >= 2 else 1


def per_channel(a: Array) -> Array:
  """`[C]`: the sum of `a` over every axis but its channel one (`channel_count`)."""
  return jnp.sum(a.reshape(-1, channel_count(a.shape)), axis=0)


def rademacher_like(key: PRNGKey, x: PyTree, count: int) -> PyTree:
  """`count` +-1 probes shaped like `x`: leaves `[count, *leaf.shape]`.

  One draw of `[count, size of x]` split into the leaves: drawing per leaf
  (or per probe under `vmap`) gave XLA:CPU one random-bits computation per
  leaf and probe to compile, ten times slower to compile for a small CNN.
  """
  flat, unravel = ravel_pytree(x)
  v = jax.random.rademacher(key, (count, flat.size), flat.dtype)
  return jax.vmap(unravel)(v)


def quadratic_forms(loss_fn: LossFn, x: PyTree, batch: PyTree, v: PyTree,
                    channels: bool = False) -> PyTree:
  """Per leaf `v_l . (H v)_l` (`channels`: split per channel, `[C]`): H the
  Hessian of `loss_fn(., batch)` at `x`."""
  _, hv = jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (x,), (v,))
  if channels:
    return jax.tree.map(lambda a, b: per_channel((a * b).astype(jnp.float32)), v, hv)
  return jax.tree.map(lambda a, b: jnp.vdot(a, b).astype(jnp.float32), v, hv)


def estimator(loss_fn: LossFn, *, probes: int, channels: bool = False) -> Estimator:
  """The estimator of `loss_fn`'s Hessian-block traces (see `Estimator`).

  Args:
    loss_fn: `loss_fn(x, batch) -> scalar`, twice differentiable in `x`.
    probes: probes per iteration and batch, evaluated together by `vmap`
      (memory grows with it: one forward-over-reverse pass per probe).
    channels: also estimate each leaf's trace per channel (see the module doc).

  Raises:
    ValueError: `probes` < 1.
  """
  check_probes(probes)

  def step(key: PRNGKey, x: PyTree, batch: PyTree) -> PyTree:
    vs = rademacher_like(key, x, probes)  # leaves [P, ...]
    # Leaves [P], or [P, C] per channel.
    return jax.vmap(lambda v: quadratic_forms(loss_fn, x, batch, v, channels))(vs)

  return Estimator(step, probes, channels)


def check_probes(probes: int) -> None:
  """Raises ValueError unless `probes` is an integer >= 1."""
  if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
    raise ValueError(f"probes={probes!r}; allowed: an integer >= 1")


class Estimator:
  """`estimate(key, x, batches, tol, max_iterations) -> Estimate`.

  One jitted, pure step (`step(key, x, batch)`: per leaf, `probes` trace
  samples `[probes]`, or `[probes, C]` per channel, from vmapped probes on
  one batch; here
  `v_l . (H v)_l`, or another estimator's, `haqjax.search.hawq.gauss_newton`)
  is compiled once per shapes, for any key, batch, tolerance and cap; the
  iterations and batches loop in Python. A `lax.scan` or `while_loop`
  around the step would keep it on the device, but XLA:CPU runs the
  convolutions of a loop body about ten times slower than at top level
  (measured: 4.5 s against 0.5 s for a quickstart CNN Hessian-vector
  product on 128 images), and one step per call costs one host transfer of
  a few scalars per probe.

  Attributes:
    probes: probes per iteration and batch.
    step: the jitted step.
  """

  def __init__(self, step: Callable[[PRNGKey, PyTree, PyTree], PyTree], probes: int,
               channels: bool = False):
    self.probes = probes
    self.channels = channels
    self.step = jax.jit(step)

  def __call__(self, key: PRNGKey, x: PyTree, batches: Sequence[PyTree], tol: float,
               max_iterations: int) -> Estimate:
    """The traces of the Hessian of the mean loss over `batches`.

    Args:
      key: iteration `i` on batch `j` draws from `fold_in(fold_in(key, i), j)`.
      x: the point (a pytree of float arrays).
      batches: the batches (any pytrees `loss_fn` takes; one shape, one compile).
      tol: the estimate stops once every trace's standard error is at most
        `tol` times its magnitude (0: run `max_iterations`).
      max_iterations: the cap, >= 1.
    """
    batches = list(batches)
    if not batches:
      raise ValueError("no batches; allowed: at least one batch")
    treedef = jax.tree.structure(x)
    samples = [[] for _ in batches]  # Per batch: [probes, leaves] per iteration.
    # Per leaf, its channel samples `[C]` summed over every probe and batch.
    channel_sums = None
    converged = False
    i = 0
    while i < max_iterations and not converged:
      ikey = jax.random.fold_in(key, i)
      for j, b in enumerate(batches):
        out = [np.reshape(a, (self.probes, -1)) for a in
               jax.tree.leaves(jax.device_get(self.step(jax.random.fold_in(ikey, j), x, b)))]
        samples[j].append(np.stack([a.sum(axis=1) for a in out], axis=1))
        if self.channels:
          sums = [a.astype(np.float64).sum(axis=0) for a in out]
          channel_sums = sums if channel_sums is None else [
              s + t for s, t in zip(channel_sums, sums)]
      i += 1
      mean, se = _mean_and_standard_error([np.concatenate(s, 0) for s in samples])
      converged = bool(tol > 0 and np.all(se <= tol * np.abs(mean)))
    unflatten = lambda v: treedef.unflatten([float(m) for m in v])
    # Every batch has as many probes: the mean over batches of each batch's mean.
    by_channel = None if channel_sums is None else treedef.unflatten(
        [s / (len(batches) * self.probes * i) for s in channel_sums])
    return Estimate(traces=unflatten(mean), iterations=i, converged=converged,
                    standard_errors=unflatten(se), channel_traces=by_channel)


def _mean_and_standard_error(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Per leaf, the mean over batches of each batch's sample mean, and its standard error.

  `samples[j]` is `[n, leaves]`, batch `j`'s probes; the standard error is
  `nan` for `n < 2`.
  """
  stacked = np.stack(samples).astype(np.float64)  # [batches, n, leaves]
  count = stacked.shape[1]
  mean = stacked.mean(axis=1).mean(axis=0)
  if count < 2:
    return mean, np.full_like(mean, np.nan)
  variance = stacked.var(axis=1, ddof=1)  # [batches, leaves]
  return mean, np.sqrt(variance.sum(axis=0) / count) / stacked.shape[0]
