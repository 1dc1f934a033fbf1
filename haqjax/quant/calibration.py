"""Calibration: setting the range `[lo, hi]` of an affine quantizer from data.

Every function returns `(lo, hi)` shaped like `affine.compute_range(x, spec)`
(kept dims of the grouped view), so per-tensor, per-channel (any axis or
axes) and per-group ranges all work, and the result feeds
`affine.fake_quant(x, bits, spec, lo=lo, hi=hi)`:

* `minmax_range`: the minimum and maximum;
* `ema_range` / `ema_calibrator`: an exponential moving average of per-batch
  min/max (Jacob et al. 2018), over a stack of batches or streamed;
* `percentile_range`: the (100 - p)th and pth percentiles (the pth percentile
  of |x| when symmetric);
* `mse_range`: the clip with the least quantization MSE among fractions of
  the min-max range (Banner et al. 2019; Nagel et al. 2021);
* `kl_range`: the threshold minimising the KL divergence between the
  clipped and the quantized histograms of |x| (Migacz 2017), which HAQ uses
  for tensors below 5 bits (`haqjax.quant.kl`, re-exported here).

`bits` is a traced int32 scalar throughout: nothing branches on it and no
shape depends on it, so one compiled function serves 1..8 bits and
`FLOAT_BITS` (32), and `jax.vmap` over bits works. Bit-width-independent
methods (minmax, ema, percentile) take no bits.

Non-finite values: a range whose elements include NaN or +-Inf comes out as
NaN (both `lo` and `hi`), whatever the method; ranges of other channels or
groups are unaffected. Non-finite data are never silently clipped away (a
percentile or KL threshold could otherwise hide an Inf); call
`affine.check_finite` outside jit for a clear error. In the EMA a NaN range
stays NaN for every later batch.

References:
  Jacob et al., "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", CVPR 2018.
  Migacz, "8-bit Inference with TensorRT", GPU Technology Conference 2017.
  Banner, Nahshan and Soudry, "Post-training 4-bit quantization of
  convolutional networks for rapid-deployment", NeurIPS 2019.
  Nagel et al., "A White Paper on Neural Network Quantization", 2021.
  Wang et al., "HAQ: Hardware-Aware Automated Quantization with Mixed
  Precision", CVPR 2019.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from haqjax.quant import affine
from haqjax.quant.affine import AffineSpec
from haqjax.quant.kl import kl_range
from haqjax.typing import Array, ArrayLike

METHODS = ("minmax", "ema", "percentile", "mse", "kl")


def minmax_range(x: ArrayLike, spec: AffineSpec = AffineSpec()) -> tuple[Array, Array]:
  """The minimum and maximum of `x` per range.

  Args:
    x: the tensor.
    spec: granularity (channel axes, groups); the grid does not matter.

  Returns:
    `(lo, hi)`, float32 with the kept dims of `affine.compute_range`; NaN for
    a range holding NaN or Inf.

  Example:
    >>> import jax.numpy as jnp
    >>> from haqjax.quant import calibration
    >>> from haqjax.quant.affine import AffineSpec
    >>> x = jnp.array([[1.0, -2.0], [3.0, 0.5]])
    >>> lo, hi = calibration.minmax_range(x, AffineSpec(channel_axis=0))
    >>> lo.ravel().tolist(), hi.ravel().tolist()
    ([-2.0, 0.5], [1.0, 3.0])
  """
  xg, axes = affine.grouped_view(x, spec)
  lo = jnp.min(xg, axis=axes, keepdims=True)
  hi = jnp.max(xg, axis=axes, keepdims=True)
  return affine.nan_where_non_finite(lo, hi, xg, axes)


class EmaRangeState(NamedTuple):
  """Running range of `ema_calibrator`.

  Attributes:
    lo: EMA of per-batch minima, kept dims of `affine.compute_range`.
    hi: EMA of per-batch maxima.
    count: int32 number of batches seen; the first one sets `lo`, `hi`.
  """
  lo: Array
  hi: Array
  count: Array


class RangeCalibrator(NamedTuple):
  """A streaming calibrator: `(init, update)` pure functions (optax style).

  Attributes:
    init: `init(x) -> state` for batches shaped like `x` (shape only).
    update: `update(state, x) -> state` folding one batch into the state.
  """
  init: Callable[[ArrayLike], EmaRangeState]
  update: Callable[[EmaRangeState, ArrayLike], EmaRangeState]


def _check_decay(decay) -> None:
  if isinstance(decay, (int, float)) and not 0.0 <= decay < 1.0:
    raise ValueError(f"decay is {decay!r}; allowed: a float in [0, 1)")


def ema_calibrator(spec: AffineSpec = AffineSpec(), decay: ArrayLike = 0.9
                   ) -> RangeCalibrator:
  """EMA of per-batch min/max, for activations seen one batch at a time.

  `lo <- decay * lo + (1 - decay) * min(batch)` (and likewise `hi`), the
  first batch setting the range; `decay` may be traced.

  Args:
    spec: granularity of the ranges.
    decay: weight of the running range, in [0, 1).

  Returns:
    A `RangeCalibrator`; the range is `(state.lo, state.hi)`.

  Raises:
    ValueError: `decay` (a Python number) outside [0, 1).

  Example:
    >>> import jax.numpy as jnp
    >>> from haqjax.quant import calibration
    >>> cal = calibration.ema_calibrator(decay=0.5)
    >>> state = cal.init(jnp.zeros((4,)))
    >>> state = cal.update(state, jnp.array([0.0, 1.0, 2.0, 4.0]))
    >>> state = cal.update(state, jnp.array([-2.0, 0.0, 1.0, 2.0]))
    >>> float(state.lo[0]), float(state.hi[0])
    (-1.0, 3.0)

  References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018.
  """
  _check_decay(decay)

  def init(x: ArrayLike) -> EmaRangeState:
    shape = jax.eval_shape(lambda x: minmax_range(x, spec)[0], jnp.asarray(x)).shape
    zeros = jnp.zeros(shape, jnp.float32)
    return EmaRangeState(lo=zeros, hi=zeros, count=jnp.int32(0))

  def update(state: EmaRangeState, x: ArrayLike) -> EmaRangeState:
    lo, hi = minmax_range(x, spec)
    d = jnp.asarray(decay, jnp.float32)
    first = state.count == 0  # the first batch sets the range
    new_lo = jnp.where(first, lo, d * state.lo + (1.0 - d) * lo)
    new_hi = jnp.where(first, hi, d * state.hi + (1.0 - d) * hi)
    return EmaRangeState(lo=new_lo, hi=new_hi, count=state.count + 1)

  return RangeCalibrator(init=init, update=update)


def ema_range(xs: ArrayLike, spec: AffineSpec = AffineSpec(), decay: ArrayLike = 0.9
              ) -> tuple[Array, Array]:
  """EMA of min/max over a stack of batches `xs` (`lax.scan`).

  Args:
    xs: `[num_batches, *tensor_shape]`; `spec` refers to the tensor axes (axis
      0 of a batch is axis 1 of `xs`).
    spec: granularity of the ranges.
    decay: weight of the running range, in [0, 1); may be traced.

  Returns:
    `(lo, hi)` after the last batch, kept dims of
    `affine.compute_range(xs[0], spec)`.

  Raises:
    ValueError: `decay` (a Python number) outside [0, 1).

  References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018.
  """
  xs = jnp.asarray(xs)
  if xs.ndim < 1 or xs.shape[0] < 1:
    raise ValueError(f"xs has shape {xs.shape}; allowed: [num_batches >= 1, *tensor_shape]")
  cal = ema_calibrator(spec, decay)
  state, _ = jax.lax.scan(lambda s, x: (cal.update(s, x), None), cal.init(xs[0]), xs)
  return state.lo, state.hi


def percentile_range(x: ArrayLike, spec: AffineSpec = AffineSpec(),
                     percentile: ArrayLike = 99.99) -> tuple[Array, Array]:
  """Percentile clipping: ignores the `100 - percentile` % most extreme values.

  With `t(q)` the qth percentile of the range's elements (numpy's default
  'linear' interpolation):

  * signed symmetric spec: `(-t, t)` with `t` the pth percentile of |x|;
  * signed asymmetric spec: `(t(100 - p), t(p))` of x;
  * unsigned spec (non-negative data): `(min(x), t(p))`; `lo` stays at the
    minimum.

  Args:
    x: the tensor.
    spec: grid kind and granularity.
    percentile: p in (0, 100]; 100 gives the min-max (absmax) range. May be
      traced.

  Returns:
    `(lo, hi)`, kept dims of `affine.compute_range`.

  Raises:
    ValueError: `percentile` (a Python number) outside (0, 100].

  Example:
    >>> import jax.numpy as jnp
    >>> from haqjax.quant import calibration
    >>> x = jnp.arange(-100.0, 101.0)
    >>> lo, hi = calibration.percentile_range(x, percentile=99.0)
    >>> float(lo[0]), float(hi[0])
    (-99.0, 99.0)

  References:
    Wu et al., "Integer Quantization for Deep Learning Inference: Principles
    and Empirical Evaluation", 2020.
  """
  if isinstance(percentile, (int, float)) and not 0.0 < percentile <= 100.0:
    raise ValueError(f"percentile is {percentile!r}; allowed: a number in (0, 100]")
  xg, axes = affine.grouped_view(x, spec)
  p = jnp.asarray(percentile, jnp.float32)

  def pct(v, q):
    return jnp.percentile(v, q, axis=axes, keepdims=True)

  if spec.signed and spec.symmetric:
    t = pct(jnp.abs(xg), p)
    lo, hi = -t, t
  elif spec.signed:
    lo, hi = pct(xg, 100.0 - p), pct(xg, p)
  else:
    lo, hi = jnp.min(xg, axis=axes, keepdims=True), pct(xg, p)
  return affine.nan_where_non_finite(lo, hi, xg, axes)


def strided_subset(x: ArrayLike, max_samples: int) -> Array:
  """`max_samples` values evenly strided over `x` (flattened), its minimum
  and maximum among them, so that a clip search's candidates span the whole
  range; `x` flattened when it holds no more."""
  flat = jnp.ravel(jnp.asarray(x))
  if flat.size <= max_samples:
    return flat
  index = (jnp.arange(max_samples) * (flat.size / max_samples)).astype(jnp.int32)
  return flat[index].at[0].set(jnp.min(flat)).at[1].set(jnp.max(flat))


def _eval_spec(spec: AffineSpec) -> AffineSpec:
  """`spec` with deterministic rounding, for scoring candidate ranges."""
  if spec.rounding == "stochastic":
    return dataclasses.replace(spec, rounding="nearest_even")
  return spec


def mse_range(x: ArrayLike, bits: ArrayLike, spec: AffineSpec = AffineSpec(), *,
              num_candidates: int = 100, chunk_size: int | None = None
              ) -> tuple[Array, Array]:
  """The clip with the least quantization MSE, per range.

  Candidate `k` (1..n) is the min-max range shrunk towards 0 by
  `f_k = k / n`: `(f_k * min, f_k * max)`. For a symmetric spec that is
  `f_k * absmax`; for an asymmetric one both ends shrink by the same factor
  (a one-dimensional search; the grid keeps 0 exact). Each range (channel,
  group) independently takes the candidate minimising
  `mean((fake_quant(x) - x) ** 2)` over its elements; ties go to the larger
  clip, so `f = 1` (min-max) wins at `FLOAT_BITS`, where every error is 0.
  Min-max is always a candidate, so the result is never worse than it.

  All candidates are evaluated at once with `jax.vmap` (memory
  `num_candidates * x.size` floats); `chunk_size` evaluates them that many
  at a time (`lax.map`) instead. Stochastic rounding is scored with
  round-to-nearest.

  Args:
    x: the tensor.
    bits: bit-width, a traced int32 scalar.
    spec: grid and granularity.
    num_candidates: n, the number of clip fractions (static).
    chunk_size: candidates per vectorised step; None for all at once.

  Returns:
    `(lo, hi)`, kept dims of `affine.compute_range`.

  Raises:
    ValueError: `num_candidates` or `chunk_size` not a positive integer.

  Example:
    >>> import jax
    >>> from haqjax.quant import calibration
    >>> x = jax.random.laplace(jax.random.key(0), (10_000,))
    >>> lo, hi = calibration.mse_range(x, 2)
    >>> bool(hi[0] < 0.5 * jax.numpy.abs(x).max())
    True

  References:
    Banner, Nahshan and Soudry, "Post-training 4-bit quantization of
    convolutional networks for rapid-deployment", NeurIPS 2019.
    Nagel et al., "A White Paper on Neural Network Quantization", 2021.
  """
  if not isinstance(num_candidates, int) or num_candidates < 1:
    raise ValueError(f"num_candidates is {num_candidates!r}; allowed: a positive integer")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size is {chunk_size!r}; allowed: a positive integer or None")
  x = jnp.asarray(x)
  xf = x.astype(jnp.float32)
  xg, axes = affine.grouped_view(x, spec)
  lo, hi = jnp.min(xg, axis=axes, keepdims=True), jnp.max(xg, axis=axes, keepdims=True)
  eval_spec = _eval_spec(spec)
  # Descending, so that argmin's first-index tie-break prefers larger clips.
  k = jnp.arange(num_candidates, 0, -1, dtype=jnp.float32)
  fractions = k * (1.0 / num_candidates)  # [n]; fractions[0] == 1 exactly

  def error(f):  # -> kept dims
    y = affine.fake_quant(xf, bits, eval_spec, lo=f * lo, hi=f * hi)
    sq = affine.to_groups(jnp.square(y - xf), spec)
    return jnp.mean(sq, axis=axes, keepdims=True)

  if chunk_size is None:
    errors = jax.vmap(error)(fractions)  # [n, *kept]
  else:
    errors = jax.lax.map(error, fractions, batch_size=chunk_size)
  # A NaN error (non-finite x) must not win; `nan_where_non_finite` marks those
  # ranges.
  errors = jnp.where(jnp.isnan(errors), jnp.inf, errors)
  best = jnp.argmin(errors, axis=0)  # kept dims
  f = fractions[best]
  return affine.nan_where_non_finite(f * lo, f * hi, xg, axes)


def calibrate_range(x: ArrayLike, bits: ArrayLike, spec: AffineSpec = AffineSpec(),
                    method: str = "minmax", **options) -> tuple[Array, Array]:
  """The range of `x` by any of `METHODS`.

  Args:
    x: the tensor; for 'ema' a stack `[num_batches, *tensor_shape]`.
    bits: bit-width, a traced int32 scalar (unused by 'minmax', 'ema' and
      'percentile').
    spec: grid and granularity.
    method: one of `METHODS`.
    **options: keyword options of the method's function (`decay`,
      `percentile`, `num_candidates`, `chunk_size`, `num_bins`).

  Returns:
    `(lo, hi)`, kept dims of `affine.compute_range`.

  Raises:
    ValueError: unknown `method`, or an invalid option value.

  Example:
    >>> import jax.numpy as jnp
    >>> from haqjax.quant import affine, calibration
    >>> x = jnp.linspace(-1.0, 1.0, 101)
    >>> lo, hi = calibration.calibrate_range(x, 4, method="percentile", percentile=90.0)
    >>> y = affine.fake_quant(x, 4, lo=lo, hi=hi)
  """
  if method == "minmax":
    return minmax_range(x, spec, **options)
  if method == "ema":
    return ema_range(x, spec, **options)
  if method == "percentile":
    return percentile_range(x, spec, **options)
  if method == "mse":
    return mse_range(x, bits, spec, **options)
  if method == "kl":
    return kl_range(x, bits, spec, **options)
  raise ValueError(f"method is {method!r}; allowed: {', '.join(METHODS)}")
