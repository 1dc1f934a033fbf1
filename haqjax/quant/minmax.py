"""Uniform min-max fake quantization with a straight-through estimator.

The range of each tensor (or channel) is its current min/max, so nothing is
clipped and the plain STE (identity gradient, Bengio et al. 2013) is exact
inside the range. Bits are traced values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from haqjax.policy import FLOAT_BITS
from haqjax.quant.base import Quantizer
from haqjax.typing import Array, ArrayLike, PyTree


def _reduce_axes(x: Array, channel_axis: int | None) -> tuple[int, ...] | None:
  if channel_axis is None:
    return None
  channel_axis %= x.ndim
  return tuple(a for a in range(x.ndim) if a != channel_axis)


def ste(x: Array, q: Array) -> Array:
  """Forward exactly `q`, backward identity to `x`.

  Written as `q' + (x - x')` (primes: stop_gradient) rather than
  `x + (q - x)'`, whose rounding error depends on how XLA fuses it.
  """
  sg = jax.lax.stop_gradient
  return sg(q) + (x - sg(x))


def pow2(bits: ArrayLike) -> Array:
  """2**bits as an exact float32 (integer shift; `**` on floats is not exact)."""
  bits = jnp.clip(jnp.asarray(bits, jnp.int32), 0, 30)
  return jnp.left_shift(jnp.int32(1), bits).astype(jnp.float32)


def symmetric_fake_quant(x: Array, bits: ArrayLike,
                         channel_axis: int | None = None) -> Array:
  """Signed symmetric fake-quant; 1 bit is sign(x) * mean|x| (binary)."""
  bits = jnp.asarray(bits, jnp.int32)
  axes = _reduce_axes(x, channel_axis)
  absmax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  qmax = jnp.maximum(pow2(bits - 1) - 1, 1.0)
  # Only multiply by broadcast values: XLA rewrites a division by a broadcast
  # into a reciprocal multiply in some programs (e.g. under vmap) but not in
  # others, and one ulp is enough to flip a rounding.
  scale = jnp.where(absmax > 0, absmax * (1.0 / qmax), 1.0)
  inv_scale = jnp.where(absmax > 0, qmax / absmax, 1.0)
  q = jnp.clip(jnp.round(x * inv_scale), -qmax, qmax) * scale
  binary = jnp.where(x >= 0, 1.0, -1.0) * jnp.mean(jnp.abs(x), axis=axes, keepdims=True)
  q = jnp.where(bits <= 1, binary, q)
  return jnp.where(bits >= FLOAT_BITS, x, q.astype(x.dtype))


def unsigned_fake_quant(x: Array, bits: ArrayLike) -> Array:
  """Unsigned fake-quant of a non-negative tensor on [0, max(x)]."""
  bits = jnp.asarray(bits, jnp.int32)
  hi = jnp.max(x)
  qmax = pow2(bits) - 1
  scale = jnp.where(hi > 0, hi * (1.0 / qmax), 1.0)
  inv_scale = jnp.where(hi > 0, qmax / hi, 1.0)
  q = jnp.clip(jnp.round(x * inv_scale), 0, qmax) * scale
  return jnp.where(bits >= FLOAT_BITS, x, q.astype(x.dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMaxWeight(Quantizer):
  """Symmetric weight fake-quant, per output channel by default.

  Attributes:
    channel_axis: axis that keeps its own scale (-1 is the output channel of
      haqjax kernels); None for one scale per tensor.
  """
  channel_axis: int | None = -1

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike) -> Array:
    del params
    return ste(x, symmetric_fake_quant(x, bits, self.channel_axis))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMaxActivation(Quantizer):
  """Per-tensor activation fake-quant: unsigned when the input has no negative
  value (after ReLU, as HAQ does), signed symmetric otherwise."""

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike) -> Array:
    del params
    signed = jnp.min(x) < 0
    q = jnp.where(signed, symmetric_fake_quant(x, bits),
                  unsigned_fake_quant(jnp.maximum(x, 0), bits))
    return ste(x, q)
