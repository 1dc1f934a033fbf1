"""Gauss-Newton traces of a softmax cross-entropy, one per leaf of a pytree.

For logits `z(x, batch)` `[B, C]` and the loss `mean_n CE(z_n, y_n)`, the
generalized Gauss-Newton matrix

    G = J^T H_z J,   H_z = blockdiag_n (diag(p_n) - p_n p_n^T) / B,

(`J = dz/dx`, `p_n = softmax(z_n)`) is the loss's Hessian without the terms
`sum_c dL/dz_c * d^2 z_c / dx^2` of the network's own curvature. It is
positive semi-definite, equals the Hessian wherever the logits are linear
in `x` (a classifier's kernel and its input), and is the Fisher information
of the model's predictive distribution (Martens 2020). The targets do not
enter it, so label smoothing does not change it.

Estimator (Martens et al. 2012's curvature propagation, in its Rademacher
form): per probe, `r` Rademacher `[B, C]` and `u_n = S_n r_n` with

    S_n = (diag(sqrt(p_n)) - p_n sqrt(p_n)^T) / sqrt(B),   S_n S_n^T = H_z,n,

one reverse pass gives `g = J^T u`, and for every leaf `||g_l||^2` is an
unbiased sample of `Tr(G_ll)` (the probes of different examples are
independent, so the cross terms between examples vanish in expectation).
Every sample is a squared norm, never negative, and a probe costs one
reverse pass (vmapped over the probes after one shared forward pass)
against a forward-over-reverse pass for a Hutchinson probe of the Hessian.
On the quickstart CNN (24 samples of 8 probes on one batch of 128) a
sample's relative standard deviation was 0.06-0.08 for the layer inputs and
0.10-0.27 for the kernels, against 0.61-1.95 and 0.17-0.88 for Hutchinson's
on the Hessian.

References:
  Schraudolph. Fast Curvature Matrix-Vector Products for Second-Order
  Gradient Descent. Neural Computation 2002.
  Martens, Sutskever & Swersky. Estimating the Hessian by Back-propagating
  Curvature. ICML 2012.
  Martens. New Insights and Perspectives on the Natural Gradient Method.
  JMLR 2020.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from haqjax.search.hawq import hutchinson
from haqjax.typing import Array
from haqjax.typing import PRNGKey
from haqjax.typing import PyTree

LogitsFn = Callable[[PyTree, PyTree], Array]


def output_probes(key: PRNGKey, logits: Array, count: int) -> Array:
  """`[count, B, C]` cotangents `S_n r_n` (see the module doc) for `logits` `[B, C]`."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  root = jnp.sqrt(p)
  r = jax.random.rademacher(key, (count, *p.shape), jnp.float32)
  u = root * r - p * jnp.sum(root * r, axis=-1, keepdims=True)
  return u / jnp.sqrt(jnp.float32(p.shape[0]))


def estimator(logits_fn: LogitsFn, *, probes: int,
              channels: bool = False) -> hutchinson.Estimator:
  """The estimator of the Gauss-Newton block traces of `mean CE(logits_fn(x, batch))`.

  Args:
    logits_fn: `logits_fn(x, batch) -> [B, C]`, differentiable in `x`.
    probes: probes per iteration and batch (one reverse pass each, vmapped).
    channels: also estimate each leaf's trace per channel (its last axis;
      `hutchinson`'s module doc): `||g_l,c||^2`, the squared norm of the
      channel's slice of the same sample.

  Returns:
    A `hutchinson.Estimator`: the same iterations, keys, tolerance and cap.

  Raises:
    ValueError: `probes` < 1.
  """
  hutchinson.check_probes(probes)

  def step(key: PRNGKey, x: PyTree, batch: PyTree) -> PyTree:
    logits, pullback = jax.vjp(lambda p: logits_fn(p, batch), x)
    if logits.ndim != 2:
      raise ValueError(f"logits have shape {logits.shape}; allowed: [batch, classes]")
    grads = jax.vmap(pullback)(output_probes(key, logits, probes))[0]  # leaves [P, ...]
    if channels:  # Leaves [P, C].
      return jax.tree.map(lambda g: jax.vmap(hutchinson.per_channel)(
          jnp.square(g.astype(jnp.float32))), grads)
    return jax.tree.map(
        lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(probes, -1), axis=1),
        grads)  # leaves [P]

  return hutchinson.Estimator(step, probes, channels)
