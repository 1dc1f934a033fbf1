"""Uniform affine quantization with traced bit-widths.

The integer grid of `bits` bits is `[qmin, qmax]`:

* signed: `[-2^(b-1), 2^(b-1) - 1]`, narrow range `[-2^(b-1) + 1, 2^(b-1) - 1]`;
* unsigned: `[0, 2^b - 1]`, narrow range `[1, 2^b - 1]`.

A real range `[lo, hi]` maps to that grid by a scale and an integer zero point::

    code = clip(rounding(x * (1 / scale)) + zero_point, qmin, qmax)
    x_hat = (code - zero_point) * scale

Symmetric quantization fixes `zero_point = 0` and takes the scale from
`m = max(|lo|, |hi|)`:

* signed: `scale = m / ((qmax - qmin) / 2) = m / (2^(b-1) - 1/2)`, the
  convention of PyTorch's symmetric observers, so that all `2^b` codes are
  used: `-m` falls on `-(2^(b-1) - 1/2)`, which rounds (half to even) to
  `qmin = -2^(b-1)`, and `+m` to `qmax` (half a step is clipped). A W2
  tensor has the 4 levels `{-2, -1, 0, 1} * scale`, a W4 tensor 16;
* signed narrow range: `scale = m / qmax` on `[-qmax, qmax]`, `2^b - 1`
  levels symmetric about 0;
* unsigned: `scale = max(hi, 0) / qmax`.

In float32 the product `x * (1 / scale)` would land a few ulps either side of
the tie at `-m` (the scale, its reciprocal and the product each round), so
the signed non-narrow divisor is widened by `TIE_MARGIN` (one part in 2^20,
four times those errors): `-m` then maps just past the tie and rounds to
`qmin`, as in exact arithmetic, by the same plain `round(x * (1 / scale))`
that an integer engine applies to the stored scale. Asymmetric quantization stretches `[lo, hi]` (widened to
contain 0, so that 0 is exact) over the whole grid. A signed symmetric 1-bit
grid has no zero and is binary: codes are `sign(x)` in {-1, +1} and
`x_hat = code * scale` with `scale = max|x|`.

Granularity is a property of the range: per tensor, per channel (one range for
each index of `channel_axis`, any axis or axes) or per group (blocks of
`group_size` consecutive elements along `group_axis`, within each channel).
`compute_range` returns ranges with kept dims that broadcast against the
grouped view of `x`; `fake_quant` handles the reshapes.

Scales are multiplied by their reciprocal, computed once on the small range
array: XLA rewrites a division by a broadcast value into a reciprocal multiply
in some programs (under `vmap`, for instance) and not others, and a single ulp
flips a rounding. The numpy references in the tests do the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from haqjax.policy import FLOAT_BITS
from haqjax.typing import Array, ArrayLike, PRNGKey

ROUNDINGS = ("nearest_even", "stochastic", "floor", "ceil")
# Relative widening of the signed symmetric divisor (qmax - qmin) / 2 that puts
# -max|x| past the tie qmin + 1/2 in float32: the scale, its reciprocal and
# x * (1 / scale) each round once (< 2^-22 relative together); 2^-20 leaves
# room for a less exact hardware reciprocal.
TIE_MARGIN = 2.0 ** -20


@dataclasses.dataclass(frozen=True, kw_only=True)
class AffineSpec:
  """How a tensor is mapped to integers (everything but the bit-width).

  Attributes:
    signed: signed integer grid; unsigned suits non-negative tensors (after
      ReLU).
    symmetric: zero point fixed at 0 (scale from the absolute maximum);
      otherwise asymmetric with an integer zero point.
    narrow_range: drop the most negative code (signed) or code 0 (unsigned),
      so a signed grid is symmetric about 0.
    channel_axis: axis (or axes) that keeps its own range; None for one range
      per tensor (or per group).
    group_size: when set, one range for every `group_size` consecutive
      elements along `group_axis` (within each channel).
    group_axis: the axis split into groups (the input axis of a dense kernel
      `[in, out]` is -2).
    rounding: 'nearest_even', 'stochastic' (needs a key), 'floor' or 'ceil'.
  """
  signed: bool = True
  symmetric: bool = True
  narrow_range: bool = False
  channel_axis: int | tuple[int, ...] | None = None
  group_size: int | None = None
  group_axis: int = -2
  rounding: str = "nearest_even"

  def __post_init__(self):
    if self.rounding not in ROUNDINGS:
      raise ValueError(f"rounding is {self.rounding!r}; allowed: {', '.join(ROUNDINGS)}")
    if self.group_size is not None and (
        not isinstance(self.group_size, int) or self.group_size < 1):
      raise ValueError(f"group_size is {self.group_size!r}; allowed: a positive integer or None")
    axes = self.channel_axes
    if any(not isinstance(a, int) or isinstance(a, bool) for a in axes):
      raise ValueError(f"channel_axis is {self.channel_axis!r}; allowed: an int, a tuple "
                       "of ints or None")

  @property
  def channel_axes(self) -> tuple[int, ...]:
    if self.channel_axis is None:
      return ()
    if isinstance(self.channel_axis, Sequence):
      return tuple(self.channel_axis)
    return (self.channel_axis,)


def pow2(bits: ArrayLike) -> Array:
  """2**bits as an exact float32 (an integer shift; float `**` is not exact)."""
  bits = jnp.clip(jnp.asarray(bits, jnp.int32), 0, 30)
  return jnp.left_shift(jnp.int32(1), bits).astype(jnp.float32)


def qrange(bits: ArrayLike, *, signed: bool, narrow_range: bool = False
           ) -> tuple[Array, Array]:
  """The integer grid `(qmin, qmax)` of `bits` bits, as float32 (traced bits)."""
  bits = jnp.asarray(bits, jnp.int32)
  if signed:
    half = pow2(bits - 1)
    return -half + (1.0 if narrow_range else 0.0), half - 1.0
  return jnp.float32(1.0 if narrow_range else 0.0), pow2(bits) - 1.0


def _normalize(axes: Sequence[int], ndim: int, field: str, value) -> tuple[int, ...]:
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{field} is {value!r}; allowed: axes of a {ndim}-d tensor")
    out.append(a % ndim)
  return tuple(out)


def to_groups(x: Array, spec: AffineSpec) -> Array:
  """`x` with `group_axis` split into `[n_groups, group_size]` (a no-op when
  `group_size` is None). The split adds one axis right after `group_axis`."""
  if spec.group_size is None:
    return x
  axis = _normalize((spec.group_axis,), x.ndim, "group_axis", spec.group_axis)[0]
  n = x.shape[axis]
  if n % spec.group_size:
    raise ValueError(f"group_size is {spec.group_size}; allowed: a divisor of the "
                     f"{n} elements along group_axis={spec.group_axis}")
  return x.reshape(*x.shape[:axis], n // spec.group_size, spec.group_size,
                   *x.shape[axis + 1:])


def from_groups(xg: Array, shape: Sequence[int]) -> Array:
  """Inverse of `to_groups`."""
  return xg.reshape(shape)


def reduce_axes(ndim: int, spec: AffineSpec) -> tuple[int, ...]:
  """Axes of the grouped view reduced to one range (all but channels/groups)."""
  channels = _normalize(spec.channel_axes, ndim, "channel_axis", spec.channel_axis)
  if spec.group_size is None:
    return tuple(a for a in range(ndim) if a not in channels)
  axis = _normalize((spec.group_axis,), ndim, "group_axis", spec.group_axis)[0]
  if axis in channels:
    raise ValueError(f"group_axis is {spec.group_axis}; allowed: an axis that is not "
                     f"a channel_axis {spec.channel_axis}")
  # In the grouped view (ndim + 1 axes) the group index sits at `axis` and the
  # position within the group at `axis + 1`; axes after it shift by one.
  keep = {a if a <= axis else a + 1 for a in channels} | {axis}
  return tuple(a for a in range(ndim + 1) if a not in keep)


def compute_range(x: Array, spec: AffineSpec) -> tuple[Array, Array]:
  """Min and max of `x` per tensor/channel/group, kept dims of the grouped view.

  NaN or Inf in `x` propagates through the range to the scale, and so every
  output of that range is NaN: a tensor with non-finite values has no
  meaningful quantization, and this is never silently hidden. Outside jit,
  `check_finite` gives a clear error instead.
  """
  xg = to_groups(x, spec)
  return minmax(xg, reduce_axes(x.ndim, spec))


def grouped_view(x: ArrayLike, spec: AffineSpec) -> tuple[Array, tuple[int, ...]]:
  """The grouped view of `x` as float32, and the axes reduced to one range.

  Reducing the view over the axes with `keepdims=True` gives ranges shaped
  like those of `compute_range`: what every calibration method does.
  """
  x = jnp.asarray(x)
  return to_groups(x.astype(jnp.float32), spec), reduce_axes(x.ndim, spec)


def nan_where_non_finite(lo: Array, hi: Array, xg: Array, axes: tuple[int, ...]
                         ) -> tuple[Array, Array]:
  """`(lo, hi)`, NaN for every range whose elements of `xg` are not all finite.

  Args:
    lo, hi: ranges with the kept dims of `xg` reduced over `axes`.
    xg: the grouped view the ranges were computed from.
    axes: the reduced axes (`grouped_view`).

  Returns:
    `(lo, hi)` with both ends NaN where a range holds NaN or +-Inf, so that a
    calibration method never clips a non-finite value away silently.
  """
  finite = jnp.all(jnp.isfinite(xg), axis=axes, keepdims=True)
  nan = jnp.float32(jnp.nan)
  return jnp.where(finite, lo, nan), jnp.where(finite, hi, nan)


def minmax(x: Array, axes: Sequence[int]) -> tuple[Array, Array]:
  """`(min, max)` over `axes` with kept dims, in one pass over `x`.

  A variadic reduction reads `x` once where `jnp.min` then `jnp.max` read it
  twice (about 1.35x faster fake-quant on 1M elements on CPU). NaN propagates.
  """
  x = jnp.asarray(x)
  axes = tuple(sorted(a % x.ndim for a in axes)) if x.ndim else ()
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  x = x.astype(dtype)
  lo, hi = jax.lax.reduce(
      (x, x), (jnp.array(jnp.inf, dtype), jnp.array(-jnp.inf, dtype)),
      lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])), axes)
  shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  return lo.reshape(shape), hi.reshape(shape)


def compute_scale(lo: ArrayLike, hi: ArrayLike, bits: ArrayLike, spec: AffineSpec
                  ) -> tuple[Array, Array]:
  """Scale and zero point (float, integer-valued) mapping `[lo, hi]` to the grid.

  A range of zero width (an all-zero channel) gets scale 0: every code is
  the zero point (or, for binary, +-1) and the output is exactly 0. The
  signed symmetric grid divides `max(|lo|, |hi|)` by `(qmax - qmin) / 2`
  (widened by `TIE_MARGIN`; by `qmax` when narrow); see the module docstring.
  """
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  bits = jnp.asarray(bits, jnp.int32)
  qmin, qmax = qrange(bits, signed=spec.signed, narrow_range=spec.narrow_range)
  if spec.symmetric and spec.signed:
    absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    half_span = qmax if spec.narrow_range else (qmax - qmin) * (0.5 + 0.5 * TIE_MARGIN)
    levels = jnp.where(bits <= 1, 1.0, half_span)  # 1 bit: binary codes {-1, +1}
    scale = absmax * (1.0 / levels)
    zero_point = jnp.zeros_like(scale)
  elif spec.symmetric:
    scale = jnp.maximum(hi, 0.0) * (1.0 / jnp.maximum(qmax, 1.0))
    zero_point = jnp.zeros_like(scale)
  else:
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    scale = (hi - lo) * (1.0 / jnp.maximum(qmax - qmin, 1.0))  # >= 1 step
    safe = jnp.where(scale == 0, 1.0, scale)
    zero_point = jnp.clip(jnp.round(qmin - lo * (1.0 / safe)), qmin, qmax)
  return scale, zero_point


def _round(v: Array, rounding: str, key: PRNGKey | None) -> Array:
  if rounding == "nearest_even":
    return jnp.round(v)
  if rounding == "floor":
    return jnp.floor(v)
  if rounding == "ceil":
    return jnp.ceil(v)
  if key is None:
    raise ValueError("rounding='stochastic' needs a PRNG key; pass key=")
  return jnp.floor(v + jax.random.uniform(key, v.shape, v.dtype))


def quantize(x: Array, scale: Array, zero_point: Array, bits: ArrayLike,
             spec: AffineSpec, key: PRNGKey | None = None) -> Array:
  """Integer codes of `x` (float32, integer-valued) on the `bits`-bit grid.

  `x`, `scale` and `zero_point` must broadcast (use the grouped view of `x`
  for per-group ranges). Codes stay float so that traced bits need no integer
  dtype; `codes.astype(jnp.int8)` is exact for bits <= 8.
  """
  bits = jnp.asarray(bits, jnp.int32)
  qmin, qmax = qrange(bits, signed=spec.signed, narrow_range=spec.narrow_range)
  inv_scale = jnp.where(scale == 0, 0.0, 1.0 / scale)  # NaN stays NaN
  v = x.astype(jnp.float32) * inv_scale
  codes = jnp.clip(_round(v, spec.rounding, key) + zero_point, qmin, qmax)
  if spec.signed and spec.symmetric:
    binary = jnp.where(x >= 0, 1.0, -1.0)
    codes = jnp.where(bits <= 1, binary, codes)
  return codes


def dequantize(codes: Array, scale: Array, zero_point: Array) -> Array:
  """Real values of integer `codes`: `(codes - zero_point) * scale`."""
  return (codes - zero_point) * scale


def fake_quant(x: Array, bits: ArrayLike, spec: AffineSpec = AffineSpec(), *,
               lo: ArrayLike | None = None, hi: ArrayLike | None = None,
               key: PRNGKey | None = None) -> Array:
  """Quantize-dequantize `x` (no gradient rule; see `haqjax.quant.estimators`).

  Args:
    x: the tensor.
    bits: bit-width, a traced int; `FLOAT_BITS` (32) or more returns `x`.
    spec: grid and granularity.
    lo, hi: the range (broadcasting against the grouped view of `x`); the
      min/max of `x` at the spec's granularity when omitted.
    key: PRNG key for stochastic rounding.

  Returns:
    An array like `x` holding at most 2^bits distinct values per range.
  """
  if lo is None or hi is None:
    got_lo, got_hi = compute_range(x, spec)
    lo = got_lo if lo is None else lo
    hi = got_hi if hi is None else hi
  xg = to_groups(x, spec)
  scale, zero_point = compute_scale(lo, hi, bits, spec)
  codes = quantize(xg, scale, zero_point, bits, spec, key)
  out = from_groups(dequantize(codes, scale, zero_point), x.shape).astype(x.dtype)
  return jnp.where(jnp.asarray(bits) >= FLOAT_BITS, x, out)


def check_finite(x: ArrayLike, what: str) -> None:
  """Raises a ValueError naming `what` when `x` holds NaN or Inf (outside jit)."""
  x = jnp.asarray(x)
  bad = ~jnp.isfinite(x)
  if bool(jnp.any(bad)):
    n = int(jnp.sum(bad))
    raise ValueError(f"{what} has {n} non-finite value(s) (NaN or Inf) of "
                     f"{math.prod(x.shape)}; allowed: finite values only")
