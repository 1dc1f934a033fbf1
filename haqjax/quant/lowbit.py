"""Binary (XNOR-Net) and ternary (TWN) weights with straight-through gradients.

Both keep one scale per output channel (or per tensor):

* binary: `sign(w) * mean|w|` (Rastegari et al., 2016), the scale that
  minimises ||w - alpha * sign(w)||^2; zero weights count as positive;
* ternary: `alpha * sign(w) * [|w| > delta]` with `delta = 0.7 * mean|w|`
  and `alpha` the mean of |w| over the weights above delta (Li & Liu, 2016),
  the approximate solution of the same least-squares problem.

An all-zero channel has scale 0 and stays zero (never NaN). The backward
pass is the straight-through estimator: the identity, or with `clip_grad`
the identity where |w| <= 1 and 0 elsewhere (Hubara et al., 2016); the scale
is treated as a constant. The quantizers have a fixed number of levels, so
they ignore `bits` except `FLOAT_BITS`, which passes the weights through.

References:
  Rastegari, Ordonez, Redmon & Farhadi. XNOR-Net: ImageNet Classification
    Using Binary Convolutional Neural Networks. ECCV 2016.
  Li, Zhang & Liu. Ternary Weight Networks. arXiv:1605.04711, 2016.
  Hubara, Courbariaux, Soudry, El-Yaniv & Bengio. Binarized Neural Networks.
    NeurIPS 2016.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from haqjax.quant.base import Quantizer
from haqjax.quant.base import passthrough
from haqjax.typing import Array, ArrayLike, PRNGKey, PyTree

TWN_THRESHOLD = 0.7


def _reduce_axes(x: Array, channel_axis: int | None) -> tuple[int, ...] | None:
  if channel_axis is None:
    return None
  channel_axis %= x.ndim
  return tuple(a for a in range(x.ndim) if a != channel_axis)


def _sign(x: Array) -> Array:
  return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def binarize(w: ArrayLike, channel_axis: int | None = -1) -> Array:
  """XNOR-Net binary weights: `sign(w) * mean|w|` per channel.

  Args:
    w: weights, e.g. a kernel `[kh, kw, in, out]` or `[in, out]`.
    channel_axis: axis with its own scale (-1: the output channel of haqjax
      kernels); None for one scale per tensor.

  Returns:
    Binary weights, shaped and typed like `w` (2 values per channel).

  References:
    Rastegari et al. XNOR-Net. ECCV 2016 (section 3.1).
  """
  w = jnp.asarray(w)
  alpha = jnp.mean(jnp.abs(w), axis=_reduce_axes(w, channel_axis), keepdims=True)
  return _sign(w) * alpha


def ternarize(w: ArrayLike, channel_axis: int | None = -1,
              threshold: float = TWN_THRESHOLD) -> Array:
  """TWN ternary weights: `alpha * sign(w)` where |w| > delta, else 0.

  Args:
    w: weights, e.g. a kernel `[kh, kw, in, out]` or `[in, out]`.
    channel_axis: axis with its own threshold and scale (-1: output channel);
      None for one per tensor.
    threshold: delta as a multiple of mean|w| (0.7 in the paper).

  Returns:
    Ternary weights, shaped and typed like `w` (3 values per channel).

  References:
    Li, Zhang & Liu. Ternary Weight Networks. 2016 (equations 10-11).
  """
  w = jnp.asarray(w)
  axes = _reduce_axes(w, channel_axis)
  a = jnp.abs(w)
  delta = threshold * jnp.mean(a, axis=axes, keepdims=True)
  keep = a > delta  # Nothing in an all-zero channel.
  count = jnp.sum(keep, axis=axes, keepdims=True).astype(a.dtype)
  alpha = jnp.sum(jnp.where(keep, a, 0), axis=axes, keepdims=True) * (
      1.0 / jnp.maximum(count, 1.0))
  return jnp.where(keep, _sign(w) * alpha, 0).astype(w.dtype)


def straight_through(x: Array, q: Array, clip_grad: bool = False) -> Array:
  """Forward exactly `q`; backward the identity, or with `clip_grad` the
  identity where |x| <= 1 and 0 elsewhere."""
  sg = jax.lax.stop_gradient
  if clip_grad:
    return sg(q) + (x - sg(x)) * sg(jnp.abs(x) <= 1).astype(x.dtype)
  return sg(q) + (x - sg(x))


def _check(obj, threshold: float | None = None) -> None:
  if obj.channel_axis is not None and (
      isinstance(obj.channel_axis, bool) or not isinstance(obj.channel_axis, int)):
    raise ValueError(f"channel_axis is {obj.channel_axis!r}; allowed: an integer or None")
  if not isinstance(obj.clip_grad, bool):
    raise ValueError(f"clip_grad is {obj.clip_grad!r}; allowed: True or False")
  if threshold is not None and (
      isinstance(threshold, bool) or not isinstance(threshold, (int, float))
      or not 0 < threshold < float("inf")):
    raise ValueError(f"threshold is {threshold!r}; allowed: a finite number > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryWeight(Quantizer):
  """XNOR-Net binary weights (`binarize`) with a straight-through gradient.

  `bits` is ignored (always 2 levels) except `FLOAT_BITS`: pass-through.

  Attributes:
    channel_axis: axis with its own scale (-1: output channel); None for one.
    clip_grad: zero the gradient where |w| > 1.

  References:
    Rastegari et al. XNOR-Net. ECCV 2016.
  """
  channel_axis: int | None = -1
  clip_grad: bool = False

  def __post_init__(self):
    _check(self)

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    del params, key
    q = straight_through(x, binarize(x, self.channel_axis), self.clip_grad)
    return passthrough(x, q, bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TernaryWeight(Quantizer):
  """TWN ternary weights (`ternarize`) with a straight-through gradient.

  `bits` is ignored (always 3 levels) except `FLOAT_BITS`: pass-through.

  Attributes:
    channel_axis: axis with its own threshold and scale (-1: output channel);
      None for one.
    threshold: delta as a multiple of mean|w|.
    clip_grad: zero the gradient where |w| > 1.

  References:
    Li, Zhang & Liu. Ternary Weight Networks. 2016.
  """
  channel_axis: int | None = -1
  threshold: float = TWN_THRESHOLD
  clip_grad: bool = False

  def __post_init__(self):
    _check(self, self.threshold)

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    del params, key
    q = ternarize(x, self.channel_axis, self.threshold)
    return passthrough(x, straight_through(x, q, self.clip_grad), bits)
