r"""Benchmark: haqjax k-means against scikit-learn's on one million weights.

  python -m experiments.bench quant-codebook [--out=bench_quant-codebook.json]

(`python -m experiments.bench quant` runs it too.) Clusters 1M heavy-tailed
(Laplacian, scale 0.05) float32 weights into 16 clusters with the same
seeding and iteration rule on both sides: greedy k-means++ seeding
(scikit-learn's 2 + log(k) local trials), then at most `iters` Lloyd
iterations (scikit-learn: n_init=1, algorithm='lloyd', tol=0; both stop early
only when nothing moves). Times are wall-clock, `repeats` interleaved runs
(seeds 0..repeats-1) per implementation, reported as median, min and max;
haqjax's first call (compilation) is timed apart; scikit-learn runs with its
default OpenMP threads, and with one thread. Inertias are averaged over the
same seeds. Should give: haqjax >= 10x faster, inertia ratio <= 1.01.

The speed-up is algorithmic as well as compiled. haqjax's k-means
(`haqjax.quant.kmeans1d`) uses that weights are 1-D: it sorts them once
(O(N log N), most of its time), after which a cluster is a contiguous run of
the sorted values and prefix sums give its count and sum, so a Lloyd
iteration costs O(k log N) and never touches all N weights. scikit-learn's
Lloyd is the general d-dimensional one: every iteration computes N x k
distances (O(N k)). The ratio therefore measures the sorted 1-D Lloyd,
compiled by XLA, against general Lloyd in Cython, not JAX against Cython on
the same algorithm.
"""

from __future__ import annotations

import time

from experiments.bench import timing

SPEEDUP_SOURCE = ("algorithmic and compiled: sorted 1-D Lloyd with prefix sums, "
                  "O(k log N) per iteration after one O(N log N) sort (XLA), against "
                  "scikit-learn's general Lloyd, O(N k) per iteration (Cython)")


def run(num_weights: int = 1_000_000, bits: int = 4, iters: int = 100,
        repeats: int = 3) -> dict:
  """Times and inertias of haqjax's and scikit-learn's k-means; prints a summary.

  Args:
    num_weights: number of values to cluster.
    bits: log2 of the number of clusters.
    iters: maximum Lloyd iterations, the same for both.
    repeats: interleaved runs (seeds 0..repeats-1) per implementation, >= 3.

  Returns:
    A JSON-serialisable dict of times (seconds), inertias and their ratios.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top

  from haqjax.quant import kmeans1d  # pylint: disable=g-import-not-at-top

  x = np.random.default_rng(0).laplace(scale=0.05, size=num_weights).astype(np.float32)
  x_dev = jax.device_put(x)

  def haq(seed):
    res = kmeans1d.kmeans(jax.random.key(seed), x_dev, bits, iters=iters)
    jax.block_until_ready(res)
    return float(res.inertia), int(res.iterations)

  t0 = time.perf_counter()
  haq(0)
  compile_s = time.perf_counter() - t0

  def sk(seed):
    return KMeans(2 ** bits, init="k-means++", n_init=1, algorithm="lloyd",
                  max_iter=iters, tol=0.0, random_state=seed).fit(x[:, None])

  haq_s, sk_s, sk1_s, haq_inertia, sk_inertia, haq_iters, sk_iters = (
      [], [], [], [], [], [], [])
  for seed in range(repeats):
    t0 = time.perf_counter()
    inertia, n = haq(seed)
    haq_s.append(time.perf_counter() - t0)
    haq_inertia.append(inertia)
    haq_iters.append(n)
    t0 = time.perf_counter()
    km = sk(seed)
    sk_s.append(time.perf_counter() - t0)
    with threadpool_limits(1):
      t0 = time.perf_counter()
      sk(seed)
      sk1_s.append(time.perf_counter() - t0)
    sk_inertia.append(float(km.inertia_))
    sk_iters.append(int(km.n_iter_))
  t_haq = timing.summarize(haq_s, compile_s)
  t_sk, t_sk1 = timing.summarize(sk_s), timing.summarize(sk1_s)
  result = {
      "jax": jax.__version__,
      "num_weights": num_weights, "clusters": 2 ** bits, "max_iters": iters,
      "haqjax_seconds": round(t_haq.median, 4), "sklearn_seconds": round(t_sk.median, 4),
      "speedup": round(t_sk.median / t_haq.median, 2),
      "speedup_source": SPEEDUP_SOURCE,
      "sklearn_one_thread_seconds": round(t_sk1.median, 4),
      "speedup_vs_one_thread": round(t_sk1.median / t_haq.median, 2),
      "haqjax_compile_seconds": round(compile_s, 3),
      "times_s": {"haqjax": t_haq.to_dict("s", 4), "sklearn": t_sk.to_dict("s", 4),
                  "sklearn_one_thread": t_sk1.to_dict("s", 4)},
      "haqjax_inertia": haq_inertia, "sklearn_inertia": sk_inertia,
      "inertia_ratio": round(float(np.mean(haq_inertia) / np.mean(sk_inertia)), 5),
      "haqjax_iterations": haq_iters, "sklearn_iterations": sk_iters,
  }
  print(f"k-means, {num_weights:,} weights, {2 ** bits} clusters, <= {iters} iterations "
        f"(median of {repeats}): haqjax {t_haq.median:.3f} s (min {t_haq.min:.3f}, max "
        f"{t_haq.max:.3f}; compile {compile_s:.1f} s), scikit-learn {t_sk.median:.3f} s "
        f"(one thread {t_sk1.median:.3f} s): {result['speedup']:.1f}x, inertia ratio "
        f"{result['inertia_ratio']:.4f}. The speed-up is {SPEEDUP_SOURCE}.", flush=True)
  return result
