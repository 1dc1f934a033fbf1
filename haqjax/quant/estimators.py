"""Straight-through estimators (Bengio et al. 2013) as `jax.custom_vjp`.

Rounding has a zero gradient almost everywhere; a straight-through estimator
(STE) passes the incoming gradient through the quantizer instead:

* `ste(x, q)`: forward exactly `q`, backward the identity to `x` (the plain
  STE, right when nothing is clipped, e.g. min-max ranges);
* `clipped_ste(x, q, lo, hi)`: forward `q`, backward the identity where
  `lo <= x <= hi` and zero outside (the estimator of PACT and LSQ for the
  input: the clipped part of the tensor does not move with `x`).

Both give `q` and the quantizer's range a zero gradient; quantizers that learn
their range (LSQ, PACT) build it into their own forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from haqjax.typing import Array


def ste(x: Array, q: Array) -> Array:
  """`q` forward; the gradient of `x` is the incoming gradient.

  `q` enters through `stop_gradient`, so autodiff does not transpose the
  quantizer's graph only to carry zeros back through it (which made a QAT
  step several times slower than a float one).
  """
  return _ste(x, jax.lax.stop_gradient(q))


@jax.custom_vjp
def _ste(x: Array, q: Array) -> Array:
  del x
  return q


def _ste_fwd(x, q):
  del x
  return q, None


def _ste_bwd(_, g):
  return g, jnp.zeros_like(g)


_ste.defvjp(_ste_fwd, _ste_bwd)


def clipped_ste(x: Array, q: Array, lo: Array, hi: Array) -> Array:
  """`q` forward; the gradient of `x` is the incoming one where `lo <= x <= hi`.

  `lo` and `hi` broadcast against `x` and get no gradient; like `q`, they
  enter through `stop_gradient`.
  """
  sg = jax.lax.stop_gradient
  return _clipped_ste(x, sg(q), sg(lo), sg(hi))


@jax.custom_vjp
def _clipped_ste(x: Array, q: Array, lo: Array, hi: Array) -> Array:
  del x, lo, hi
  return q


def _clipped_fwd(x, q, lo, hi):
  inside = (x >= lo) & (x <= hi)
  residuals = (inside, jnp.zeros_like(lo), jnp.zeros_like(hi))
  return q, residuals


def _clipped_bwd(residuals, g):
  inside, zero_lo, zero_hi = residuals
  return jnp.where(inside, g, 0.0).astype(g.dtype), jnp.zeros_like(g), zero_lo, zero_hi


_clipped_ste.defvjp(_clipped_fwd, _clipped_bwd)
