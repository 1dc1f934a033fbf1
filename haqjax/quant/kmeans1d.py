"""One-dimensional k-means: a codebook of 2**bits centroids for a tensor's values.

Bits are traced: the codebook always has `NUM_CENTROIDS` = 2**MAX_BITS = 256
entries, of which the first 2**bits are active; the others are never assigned
(and are 0 in a fresh codebook). One compiled function serves every
bit-width, and `vmap` over bits works.

Weights are 1-D data, so clustering never builds an N x k distance matrix:
the weights are sorted once (O(N log N), the dominant cost), every cluster of
a sorted codebook is a contiguous run of the sorted weights bounded by the
midpoints between neighbouring centroids, and prefix sums give each cluster's
count, sum and sum of squares. A Lloyd iteration, or the evaluation of one
k-means++ candidate, then costs O(k log N), and the final labels O(N log k)
(`searchsorted`).

Starts: evenly spaced on [min, max] ('linear', recommended by Deep
Compression) or greedy k-means++ ('kmeans++', scikit-learn's rule), sampled
exactly on the sorted data.

References:
  Han, Mao & Dally. Deep Compression: Compressing Deep Neural Networks with
    Pruning, Trained Quantization and Huffman Coding. ICLR 2016.
  Arthur & Vassilvitskii. k-means++: The Advantages of Careful Seeding.
    SODA 2007.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from haqjax.policy import MAX_BITS
from haqjax.typing import Array, ArrayLike, PRNGKey

NUM_CENTROIDS = 2 ** MAX_BITS
INITS = ("kmeans++", "linear")


class KMeansResult(NamedTuple):
  """What `kmeans` returns.

  Attributes:
    codebook: `[256]` float32 centroids, ascending over the 2**bits active
      entries; inactive entries are 0.
    labels: int32, shape of `x`: index of each value's nearest active centroid.
    counts: `[256]` int32 cluster sizes (0 for empty and inactive clusters).
    active: `[256]` bool, `True` for the first 2**bits entries.
    inertia: within-cluster sum of squares, sum((x - codebook[labels])**2).
    iterations: number of Lloyd iterations run (fewer than `iters` when the
      centroids stopped moving).
  """
  codebook: Array
  labels: Array
  counts: Array
  active: Array
  inertia: Array
  iterations: Array


def num_clusters(bits: ArrayLike) -> Array:
  """2**bits as int32, with bits clipped to 0..MAX_BITS (32 gives 256)."""
  bits = jnp.clip(jnp.asarray(bits, jnp.int32), 0, MAX_BITS)
  return jnp.left_shift(jnp.int32(1), bits)


def _sort(x: Array) -> Array:
  """Ascending sort of finite float32 values through order-preserving int32
  keys (XLA:CPU sorts int32 about 4x faster than float32)."""
  b = jax.lax.bitcast_convert_type(x, jnp.int32)
  flip = jnp.int32(0x7FFFFFFF)
  keys = jax.lax.sort(b ^ ((b >> 31) & flip))  # Negatives: reverse magnitude.
  return jax.lax.bitcast_convert_type(keys ^ ((keys >> 31) & flip), jnp.float32)


def _midpoints(centers: Array) -> Array:
  """Decision boundaries of ascending `centers` ([K], +inf when inactive)."""
  return 0.5 * (centers[:-1] + centers[1:])  # [K-1]; +inf past the active ones.


def assign(codebook: ArrayLike, x: ArrayLike, bits: ArrayLike) -> Array:
  """Index of the nearest active centroid of each value of `x`.

  Works for any (also unsorted, e.g. fine-tuned) codebook: the active entries
  are sorted (256 values) and each value is located among the midpoints with
  a binary search. A value exactly between two centroids goes to the smaller
  one.

  Args:
    codebook: `[256]` centroids; entries from 2**bits on are ignored.
    x: values to assign, any shape.
    bits: traced bit-width (2**bits active centroids).

  Returns:
    int32 labels shaped like `x`, in 0..2**bits - 1 (NaN values too).
  """
  codebook = jnp.asarray(codebook, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  k = num_clusters(bits)
  active = jnp.arange(codebook.shape[-1]) < k
  order = jnp.argsort(jnp.where(active, codebook, jnp.inf), stable=True)
  mid = _midpoints(jnp.where(active, codebook, jnp.inf)[order])
  pos = jnp.searchsorted(mid, x.ravel(), side="left", method="scan_unrolled")
  return order[jnp.minimum(pos, k - 1)].astype(jnp.int32).reshape(x.shape)


class _Prefix(NamedTuple):
  """Sorted data and prefix sums of (xs - shift) and its square."""
  xs: Array  # [N] ascending.
  shift: Array  # Scalar: the median, so prefix sums stay small.
  p1: Array  # [N+1]
  p2: Array  # [N+1]


def _prefix(xs: Array) -> _Prefix:
  shift = xs[xs.shape[0] // 2]
  d = xs - shift
  zero = jnp.zeros((1,), jnp.float32)
  cumsum = functools.partial(jax.lax.associative_scan, jnp.add)  # Pairwise.
  return _Prefix(xs, shift, jnp.concatenate([zero, cumsum(d)]),
                 jnp.concatenate([zero, cumsum(d * d)]))


def _stats(pre: _Prefix, centers: Array) -> tuple[Array, Array, Array]:
  """Count, sum and squared error of each cluster of ascending `centers`.

  Args:
    pre: sorted data and its prefix sums.
    centers: `[K]` ascending centroids, +inf for the inactive ones.

  Returns:
    counts `[K]` int32, sums of (x - shift) `[K]`, and squared distances to the
    centroid `[K]` (0 for inactive clusters).
  """
  n = pre.xs.shape[0]
  hi = jnp.searchsorted(pre.xs, _midpoints(centers), side="right", method="scan")
  hi = jnp.concatenate([hi, jnp.full((1,), n, hi.dtype)])  # [K]
  lo = jnp.concatenate([jnp.zeros((1,), hi.dtype), hi[:-1]])
  counts = (hi - lo).astype(jnp.int32)
  s1 = pre.p1[hi] - pre.p1[lo]
  s2 = pre.p2[hi] - pre.p2[lo]
  c = jnp.where(jnp.isfinite(centers), centers - pre.shift, 0.0)
  cost = jnp.maximum(s2 - 2.0 * c * s1 + c * c * counts, 0.0)
  return counts, s1, cost


def _linear_init(pre: _Prefix, k: Array) -> Array:
  """k values evenly spaced on [min, max] (Deep Compression's linear init)."""
  lo, hi = pre.xs[0], pre.xs[-1]
  i = jnp.arange(NUM_CENTROIDS, dtype=jnp.float32)
  step = (hi - lo) * (1.0 / jnp.maximum(k - 1, 1).astype(jnp.float32))
  centers = jnp.where(k == 1, 0.5 * (lo + hi), lo + i * step)
  return jnp.where(jnp.arange(NUM_CENTROIDS) < k, centers, jnp.inf)


def _sample_in_cluster(pre: _Prefix, lo: Array, hi: Array, c: Array,
                       r: Array) -> Array:
  """Smallest index p in [lo, hi) whose cumulative squared distance to `c`
  from lo through p exceeds `r` (binary search on the prefix sums)."""
  def cum(q):  # Sum over [lo, q) of (x - c)**2, c relative to the shift.
    return ((pre.p2[q] - pre.p2[lo]) - 2.0 * c * (pre.p1[q] - pre.p1[lo])
            + c * c * (q - lo))

  def body(_, bounds):
    a, b = bounds
    m = (a + b) // 2
    go_left = cum(m + 1) > r
    return jnp.where(go_left, a, m + 1), jnp.where(go_left, m, b)

  steps = max(int(pre.xs.shape[0]).bit_length(), 1)
  a, _ = jax.lax.fori_loop(0, steps, body, (lo, jnp.maximum(hi - 1, lo)))
  return jnp.minimum(a, pre.xs.shape[0] - 1)


def _tree_sum(v: Array) -> Array:
  """Sum of a power-of-two-length vector in a fixed pairwise order, so that it
  rounds the same under `vmap` (a batched `jnp.sum` may reorder)."""
  while v.shape[-1] > 1:
    v = v[..., ::2] + v[..., 1::2]
  return v[..., 0]


def _kmeanspp_init(key: PRNGKey, pre: _Prefix, k: Array,
                   local_trials: int | None) -> Array:
  """Greedy k-means++ seeding (scikit-learn's rule) on sorted 1-D data.

  Each new centroid is the best (lowest total squared distance) of
  `local_trials` candidates drawn with probability proportional to the
  squared distance to the nearest chosen centroid; by default 2 + log(k)
  candidates, as in scikit-learn. The distribution is sampled exactly: a
  cluster by its share of the total, then a point inside it by binary search.
  """
  n = pre.xs.shape[0]
  max_trials = local_trials or 2 + int(math.log(NUM_CENTROIDS))
  if local_trials is None:
    trials = 2 + jnp.floor(jnp.log(k.astype(jnp.float32))).astype(jnp.int32)
  else:
    trials = jnp.int32(local_trials)
  key_first, key = jax.random.split(key)
  first = pre.xs[jax.random.randint(key_first, (), 0, n)]
  centers = jnp.full((NUM_CENTROIDS,), jnp.inf).at[0].set(first)

  def potential(centers):
    return _tree_sum(_stats(pre, centers)[2])

  def step(j, centers):
    counts, _, cost = _stats(pre, centers)
    cum = jax.lax.associative_scan(jnp.add, cost)  # Same rounding under vmap.
    u = jax.random.uniform(jax.random.fold_in(key, j), (max_trials,)) * cum[-1]
    cluster = jnp.minimum(jnp.searchsorted(cum, u, side="right"), NUM_CENTROIDS - 1)
    hi = jnp.cumsum(counts)
    lo = hi - counts
    c = jnp.where(jnp.isfinite(centers), centers - pre.shift, 0.0)
    idx = jax.vmap(_sample_in_cluster, (None, 0, 0, 0, 0))(
        pre, lo[cluster], hi[cluster], c[cluster], u - (cum - cost)[cluster])
    candidates = jax.vmap(lambda x: jnp.sort(centers.at[j].set(x)))(pre.xs[idx])
    pots = jax.vmap(potential)(candidates)  # [T]
    pots = jnp.where(jnp.arange(max_trials) < trials, pots, jnp.inf)
    return candidates[jnp.argmin(pots)]

  return jax.lax.fori_loop(1, k, step, centers)


@functools.partial(jax.jit, static_argnames=("iters", "init", "local_trials"))
def _kmeans(key: PRNGKey, x: Array, bits: Array, *, iters: int, init: str,
            local_trials: int | None) -> KMeansResult:
  flat = x.ravel().astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(flat))
  pre = _prefix(_sort(jnp.where(jnp.isfinite(flat), flat, 0.0)))
  k = num_clusters(bits)
  if init == "linear":
    centers = _linear_init(pre, k)
  else:
    centers = _kmeanspp_init(key, pre, k, local_trials)

  def cond(state):
    i, _, moved = state
    return (i < iters) & moved

  def body(state):
    i, centers, _ = state
    counts, s1, _ = _stats(pre, centers)
    mean = pre.shift + s1 / jnp.maximum(counts, 1).astype(jnp.float32)
    new = jnp.sort(jnp.where(counts > 0, mean, centers))  # Empty: keep.
    return i + 1, new, jnp.any(new != centers)

  iterations, centers, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), centers, jnp.bool_(True)))
  active = jnp.arange(NUM_CENTROIDS) < k
  counts = jnp.where(active, _stats(pre, centers)[0], 0)
  codebook = jnp.where(active, centers, 0.0)
  codebook = jnp.where(finite, codebook, jnp.nan)
  mid = _midpoints(jnp.where(active, centers, jnp.inf))  # Sorted already.
  labels = jnp.searchsorted(mid, flat, side="left", method="scan_unrolled")
  labels = labels.astype(jnp.int32)
  inertia = jnp.sum(jnp.square(flat - codebook[labels]))
  return KMeansResult(codebook, labels.reshape(x.shape), counts, active,
                      inertia, iterations)


def kmeans(key: PRNGKey | None, x: ArrayLike, bits: ArrayLike, *,
           iters: int = 100, init: str = "kmeans++",
           local_trials: int | None = None) -> KMeansResult:
  """Clusters the values of `x` (flattened) into 2**bits centroids.

  Lloyd iterations from a k-means++ or linear start, compiled once for every
  bit-width. They stop after `iters` iterations or when no centroid moves. A
  cluster that becomes empty keeps its centroid; constant data, or fewer
  distinct values than clusters, give duplicate centroids, never NaN.

  Non-finite input: outside `jit` a `ValueError`; under `jit` (where it cannot
  be checked) the whole codebook and the inertia are NaN.

  Args:
    key: PRNG key for k-means++ (unused, may be None, for `init='linear'`).
    x: the values, e.g. a layer's kernel; any shape, at least one element.
    bits: traced bit-width; 2**bits clusters (bits clipped to 0..8).
    iters: maximum number of Lloyd iterations (static).
    init: 'kmeans++' (greedy k-means++, as scikit-learn) or 'linear' (evenly
      spaced on [min, max], recommended by Deep Compression).
    local_trials: candidates per k-means++ step; None is scikit-learn's
      2 + int(log(2**bits)), 1 is plain k-means++ (static).

  Returns:
    A `KMeansResult`.

  Raises:
    ValueError: for an unknown `init`, a negative `iters`, `local_trials`
      < 1, a missing key for k-means++, empty `x`, or non-finite `x` outside
      `jit`.

  Example:
    >>> w = jax.random.laplace(jax.random.key(0), (3, 3, 16, 32)) * 0.05
    >>> res = kmeans(jax.random.key(1), w, 4)
    >>> w_shared = res.codebook[res.labels]  # 16 distinct values.

  References:
    Han, Mao & Dally. Deep Compression. ICLR 2016 (section 3).
    Arthur & Vassilvitskii. k-means++. SODA 2007.
  """
  if init not in INITS:
    raise ValueError(f"init is {init!r}; allowed: {', '.join(INITS)}")
  if not isinstance(iters, int) or iters < 0:
    raise ValueError(f"iters is {iters!r}; allowed: an integer >= 0")
  if local_trials is not None and (not isinstance(local_trials, int) or local_trials < 1):
    raise ValueError(f"local_trials is {local_trials!r}; allowed: None or an integer >= 1")
  if init == "kmeans++" and key is None:
    raise ValueError("key is None; allowed: a PRNG key (init='kmeans++' samples)")
  x = jnp.asarray(x)
  if x.size == 0:
    raise ValueError(f"x has shape {x.shape}; allowed: at least one element")
  if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError("x has NaN or infinite values; allowed: finite values")
  if key is None:
    key = jax.random.key(0)
  return _kmeans(key, x, jnp.asarray(bits, jnp.int32), iters=iters, init=init,
                 local_trials=local_trials)
