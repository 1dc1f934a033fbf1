"""The KL-divergence (entropy) threshold of TensorRT: a clipping range from data.

Migacz (2017) chooses the clip `t` of a tensor's |x| so that the quantized
distribution stays closest, in KL divergence, to the clipped one: a
histogram of |x| is scored for every number of kept bins, and the best one
sets `t`. HAQ (Wang et al. 2019) uses it for tensors below 5 bits.
`kl_range` returns the range `[lo, hi]` this clip gives, shaped like
`affine.compute_range` (per tensor, channel or group), for
`affine.fake_quant(x, bits, spec, lo=lo, hi=hi)`; it is the 'kl' method of
`haqjax.quant.calibration.calibrate_range`.

`bits` is traced: the number of levels is data and the merging of bins is
integer arithmetic with segment sums of a fixed size (`KL_MAX_LEVELS`), so
one compiled function serves every bit-width and `jax.vmap` over bits works.

References:
  Migacz, "8-bit Inference with TensorRT", GPU Technology Conference 2017.
  Wang et al., "HAQ: Hardware-Aware Automated Quantization with Mixed
  Precision", CVPR 2019.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from haqjax.policy import FLOAT_BITS
from haqjax.quant import affine
from haqjax.quant.affine import AffineSpec
from haqjax.typing import Array, ArrayLike

# Most quantization levels `kl_range` merges histogram bins into: 2^8, the
# unsigned 8-bit grid. The segment sums have this fixed size for every bits.
KL_MAX_LEVELS = 256


def _kl_levels(bits: ArrayLike, signed: bool) -> Array:
  """Number of quantization levels covering [0, threshold] (int32, traced)."""
  bits = jnp.asarray(bits, jnp.int32)
  levels = affine.pow2(bits - 1) if signed else affine.pow2(bits)
  return jnp.minimum(levels, KL_MAX_LEVELS).astype(jnp.int32)


def _kl_divergences(hist: Array, levels: Array) -> Array:
  """KL(P || Q) for every number of kept bins i = 1..num_bins (`[num_bins]`).

  Candidates with `i < levels`, or whose Q misses part of P (infinite KL),
  come out as +Inf.
  """
  num_bins = hist.shape[0]
  j = jnp.arange(num_bins, dtype=jnp.int32)  # bin index
  cum = jnp.cumsum(hist)
  total = cum[-1]

  def kl(i):  # i: number of kept bins, an int32 scalar
    keep = j < i
    kept = jnp.where(keep, hist, 0.0)  # [B]
    # Reference P: the first i bins, the outliers folded into the last one.
    p = kept + jnp.where(j == i - 1, total - cum[i - 1], 0.0)
    # Q: the i kept bins merged into `levels` chunks of i // levels bins (the
    # last chunk takes the remainder), each chunk's mass spread evenly over
    # the bins of the chunk where P is non-zero.
    width = jnp.maximum(i // levels, 1)
    seg = jnp.where(keep, jnp.minimum(j // width, levels - 1), 0)  # [B]
    nonzero = p > 0
    chunk_mass = jax.ops.segment_sum(kept, seg, KL_MAX_LEVELS)
    chunk_bins = jax.ops.segment_sum(nonzero.astype(jnp.float32), seg, KL_MAX_LEVELS)
    q = jnp.where(nonzero, chunk_mass[seg] / jnp.maximum(chunk_bins[seg], 1.0), 0.0)
    p = p / jnp.sum(p)
    q = q / jnp.sum(q)
    terms = jnp.where(nonzero, p * (jnp.log(p) - jnp.log(q)), 0.0)
    return jnp.sum(terms)

  i = jnp.arange(1, num_bins + 1, dtype=jnp.int32)
  kls = jax.vmap(kl)(i)
  return jnp.where((i < levels) | jnp.isnan(kls), jnp.inf, kls)


def _kl_threshold(v: Array, bits: Array, signed: bool, num_bins: int) -> Array:
  """The KL threshold on |v| of one range (`v` one-dimensional)."""
  a = jnp.abs(v)
  amax = jnp.max(a)
  safe = jnp.where(amax > 0, amax, 1.0)
  # Bin of each value: floor(a * num_bins / amax), amax in the last bin.
  inv_width = jnp.float32(num_bins) / safe
  idx = jnp.clip(jnp.floor(a * inv_width).astype(jnp.int32), 0, num_bins - 1)
  hist = jax.ops.segment_sum(jnp.ones_like(a), idx, num_bins)  # [B]
  kls = _kl_divergences(hist, _kl_levels(bits, signed))
  kept_bins = jnp.argmin(kls) + 1  # first minimum: the smallest threshold
  threshold = kept_bins.astype(jnp.float32) * (amax / num_bins)
  return jnp.where(jnp.asarray(bits) >= FLOAT_BITS, amax, threshold)


def kl_range(x: ArrayLike, bits: ArrayLike, spec: AffineSpec = AffineSpec(), *,
             num_bins: int = 2048) -> tuple[Array, Array]:
  """The KL-divergence (entropy) threshold of TensorRT, used by HAQ below 5 bits.

  For each range, with a histogram of |x| in `num_bins` equal bins over
  `[0, max|x|]` and `L` levels, every number of kept bins `i` in
  `L..num_bins` is scored:

  * P: the first `i` bins, with the count of all later bins (the outliers)
    added to bin `i - 1`;
  * Q: the first `i` bins of the histogram (without the outliers) merged into
    `L` chunks of `i // L` bins, the last chunk taking the remainder; each
    chunk's count is spread evenly over its bins where P is non-zero, and Q
    is 0 where P is;
  * the score is KL(P || Q) of the normalised P and Q; a candidate where Q is
    0 but P is not scores +Inf (no smoothing).

  The threshold is the upper edge `i * max|x| / num_bins` of the last kept
  bin for the least score (first on ties), so `i = num_bins` is the absmax;
  Migacz's slides write `(i + 0.5)` bin widths. At `FLOAT_BITS` the threshold
  is the absmax.

  Levels: `L = 2^(bits - 1)` for a signed spec (TensorRT's 128 at 8 bits, and
  HAQ's `n` for weights and activations alike) and `L = 2^bits` for an
  unsigned spec (every code of the unsigned grid lies in [0, t]); to
  reproduce HAQ's activation thresholds pass a signed spec. `L` is traced
  and merging is integer arithmetic with segment sums of a fixed
  `KL_MAX_LEVELS` (256) segments, so bits above 8 are scored with 256 levels.

  The range is the data's `[min(x), max(x)]` clipped to `[-t, t]`: `(-t, t)`
  for data on both sides reaching past `t`, `(min(x), t)` for non-negative
  data (as in `percentile_range`), and no wasted grid for an asymmetric
  spec on one-sided data. Per-tensor is the usual use; per-channel and
  per-group ranges are computed one range at a time (`lax.map`), each costing
  `O(num_bins^2)` (about 0.1 s on a CPU at 2048 bins, whatever the size of
  the range).

  This is Migacz's algorithm; HAQ's released code scores a variant of it
  (interpolated cumulative histograms over sqrt(size) bins).

  Args:
    x: the tensor.
    bits: bit-width, a traced int32 scalar.
    spec: grid kind (signed) and granularity.
    num_bins: histogram bins (static), at least `KL_MAX_LEVELS`.

  Returns:
    `(lo, hi)`, kept dims of `affine.compute_range`.

  Raises:
    ValueError: `num_bins` not an integer >= 256.

  Example:
    >>> import jax
    >>> from haqjax.quant import kl
    >>> x = jax.random.laplace(jax.random.key(0), (10_000,))
    >>> lo, hi = kl.kl_range(x, 4)
    >>> bool(hi[0] < jax.numpy.abs(x).max())
    True

  References:
    Migacz, "8-bit Inference with TensorRT", GPU Technology Conference 2017.
    Wang et al., "HAQ: Hardware-Aware Automated Quantization with Mixed
    Precision", CVPR 2019.
  """
  if not isinstance(num_bins, int) or num_bins < KL_MAX_LEVELS:
    raise ValueError(f"num_bins is {num_bins!r}; allowed: an integer >= {KL_MAX_LEVELS}")
  xg, axes = affine.grouped_view(x, spec)
  bits = jnp.asarray(bits, jnp.int32)
  keep = [a for a in range(xg.ndim) if a not in axes]
  kept_shape = tuple(1 if a in axes else xg.shape[a] for a in range(xg.ndim))
  size = math.prod(xg.shape[a] for a in axes)
  rows = jnp.transpose(xg, keep + list(axes)).reshape(-1, size)  # [R, N]
  t = jax.lax.map(lambda v: _kl_threshold(v, bits, spec.signed, num_bins), rows)
  t = t.reshape(kept_shape)
  lo = jnp.maximum(jnp.min(xg, axis=axes, keepdims=True), -t)
  hi = jnp.minimum(jnp.max(xg, axis=axes, keepdims=True), t)
  return affine.nan_where_non_finite(lo, hi, xg, axes)
