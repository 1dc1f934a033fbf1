r"""Benchmark: haqjax k-means against scikit-learn's on one million weights.

  python -m experiments.bench_quant_codebook [--out=bench_quant_codebook.json]

Clusters 1M heavy-tailed (Laplacian, scale 0.05) float32 weights into 16
clusters with the same algorithm on both sides: greedy k-means++ seeding
(scikit-learn's 2 + log(k) local trials), then at most `iters` Lloyd
iterations (scikit-learn: n_init=1, algorithm='lloyd', tol=0; both stop early
only when nothing moves). Times are wall-clock after compilation, the best of
`repeats` interleaved runs (scikit-learn with its default OpenMP threads,
and with one thread); inertias are averaged over the same seeds.
Should give: haqjax >= 10x faster, inertia ratio <= 1.01.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time


def run(num_weights: int = 1_000_000, bits: int = 4, iters: int = 100,
        repeats: int = 3) -> dict:
  """Times and inertias of haqjax's and scikit-learn's k-means.

  Args:
    num_weights: number of values to cluster.
    bits: log2 of the number of clusters.
    iters: maximum Lloyd iterations, the same for both.
    repeats: interleaved runs (seeds 0..repeats-1) per implementation.

  Returns:
    A JSON-serialisable dict of times (seconds), inertias and their ratios.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top

  from haqjax.quant import codebook as kmeans_lib  # pylint: disable=g-import-not-at-top

  x = np.random.default_rng(0).laplace(scale=0.05, size=num_weights).astype(np.float32)
  x_dev = jax.device_put(x)

  def haq(seed):
    res = kmeans_lib.kmeans(jax.random.key(seed), x_dev, bits, iters=iters)
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
  return {
      "benchmark": "quant_kmeans", "machine": platform.platform(),
      "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "num_weights": num_weights, "clusters": 2 ** bits, "max_iters": iters,
      "haqjax_seconds": round(min(haq_s), 4), "sklearn_seconds": round(min(sk_s), 4),
      "speedup": round(min(sk_s) / min(haq_s), 2),
      "sklearn_one_thread_seconds": round(min(sk1_s), 4),
      "speedup_vs_one_thread": round(min(sk1_s) / min(haq_s), 2),
      "haqjax_compile_seconds": round(compile_s, 3),
      "haqjax_inertia": haq_inertia, "sklearn_inertia": sk_inertia,
      "inertia_ratio": round(float(np.mean(haq_inertia) / np.mean(sk_inertia)), 5),
      "haqjax_iterations": haq_iters, "sklearn_iterations": sk_iters,
  }


def main(argv: list[str]) -> None:
  out = "bench_quant_codebook.json"
  for arg in argv[1:]:
    if arg.startswith("--out="):
      out = arg.split("=", 1)[1]
    else:
      sys.exit(f"unknown argument {arg!r}; allowed: --out=PATH")
  result = run()
  print(json.dumps(result, indent=2))
  with open(out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main(sys.argv)
