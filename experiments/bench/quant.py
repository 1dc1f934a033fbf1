r"""Quantizer benchmark: fake-quant bandwidth, k-means speed, trace counts.

  python -m experiments.bench quant [--out=bench_quant.json]

Measures, on this machine (JAX on its default backend):
  * fake-quant throughput on 1M and 16M float32 elements (per-tensor min-max
    range computed in the call, 4 bits given as a traced value, and with a
    fixed calibrated range) as a fraction of the bandwidth of a jitted
    `x * 1.0001` (target >= 0.5x), and against
    `torch.fake_quantize_per_tensor_affine` on CPU when torch is installed
    (target >= 1x); bandwidths at the median call time, each time's min and
    max beside it;
  * k-means on 1M weights, 16 clusters, equal iterations, against
    scikit-learn's KMeans (target >= 10x faster, inertia <= 1.01x; see
    `quant_codebook`: the speed-up is the sorted 1-D algorithm's as well as
    the compiler's);
  * traces of a QAT step and an eval step across 100 random policies
    (must be 1 each).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing

SIZES = (1 << 20, 1 << 24)


def _fake_quant_throughput(n: int) -> dict:
  from haqjax.quant import affine  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
  bits = jnp.int32(4)
  lo, hi = jnp.min(x), jnp.max(x)
  spec = affine.AffineSpec(signed=False, symmetric=False)  # torch's [0, 15] grid
  scale_only = jax.jit(lambda x: x * 1.0001)
  dynamic = jax.jit(lambda x, b: affine.fake_quant(x, b, spec))
  static = jax.jit(lambda x, b, lo, hi: affine.fake_quant(x, b, spec, lo=lo, hi=hi))
  repeats = 20 if n <= SIZES[0] else 5
  times = {"x_times_1.0001": timing.time_call(lambda: scale_only(x), repeats),
           "fake_quant_minmax": timing.time_call(lambda: dynamic(x, bits), repeats),
           "fake_quant_static_range": timing.time_call(lambda: static(x, bits, lo, hi),
                                                       repeats)}
  t_ref, t_dyn, t_sta = (times[k].median for k in times)
  gbps = lambda t: 2 * 4 * n / t / 1e9  # One read and one write per element.
  out = {"elements": n,
         "x_times_1.0001_gbps": round(gbps(t_ref), 2),
         "fake_quant_minmax_gbps": round(gbps(t_dyn), 2),
         "fake_quant_static_range_gbps": round(gbps(t_sta), 2),
         "minmax_vs_scale_bandwidth": round(t_ref / t_dyn, 3),
         "static_vs_scale_bandwidth": round(t_ref / t_sta, 3),
         "times_ms": {k: t.to_dict("ms", 4) for k, t in times.items()}}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    out["torch"] = "not installed"
    return out
  xt = torch.from_numpy(np.array(x))
  scale, zp = affine.compute_scale(lo, hi, bits, spec)
  s, z = float(scale), int(zp)

  def torch_fq():
    return torch.fake_quantize_per_tensor_affine(xt, s, z, 0, 15)

  def torch_fq_minmax():
    lo_t, hi_t = torch.aminmax(xt)
    lo_t, hi_t = min(float(lo_t), 0.0), max(float(hi_t), 0.0)
    scale_t = (hi_t - lo_t) / 15
    return torch.fake_quantize_per_tensor_affine(xt, scale_t, int(round(-lo_t / scale_t)),
                                                 0, 15)

  times_torch = {"torch_fake_quant": timing.time_call(torch_fq, repeats),
                 "torch_minmax_fake_quant": timing.time_call(torch_fq_minmax, repeats)}
  t_torch, t_torch_mm = (times_torch[k].median for k in times_torch)
  out["times_ms"].update({k: t.to_dict("ms", 4) for k, t in times_torch.items()})
  np.testing.assert_allclose(np.asarray(static(x, bits, lo, hi)), torch_fq().numpy(),
                             atol=float(scale) * 1.001)
  out.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "torch_fake_quant_gbps": round(gbps(t_torch), 2),
              "torch_minmax_fake_quant_gbps": round(gbps(t_torch_mm), 2),
              "static_vs_torch": round(t_torch / t_sta, 3),
              "minmax_vs_torch_minmax": round(t_torch_mm / t_dyn, 3)})
  return out


def _trace_counts(num_policies: int = 100) -> dict:
  from haqjax import models  # pylint: disable=g-import-not-at-top
  from haqjax import quant  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  from haqjax.train import steps  # pylint: disable=g-import-not-at-top
  out = {}
  for wq, aq in (("minmax", "dynamic"), ("lsq", "lsq"), ("minmax", "pact")):
    model = models.create("quickstart_cnn", num_classes=10, quant_scheme=quant.QuantScheme(
        weight=quant.weight_quantizer(wq), act=quant.act_quantizer(aq)))
    tx = steps.make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=0)
    state = steps.init_state(jax.random.key(0), model, tx, (1, 28, 28, 1))
    names = layer_table(model, (1, 28, 28, 1)).names
    batch = {"image": jax.random.uniform(jax.random.key(1), (32, 28, 28, 1)),
             "label": jnp.arange(32) % 10}
    counts = {"train": 0, "eval": 0}

    def counted(name, fn):
      def wrapper(*args):
        counts[name] += 1  # pylint: disable=cell-var-from-loop
        return fn(*args)
      return wrapper

    train = jax.jit(counted("train", functools.partial(steps.train_step, model, tx)))
    evaluate = jax.jit(counted("eval", functools.partial(steps.eval_step, model)))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(num_policies):
      policy = Policy.create(names, rng.integers(1, 9, len(names)),
                             rng.integers(1, 9, len(names)))
      new_state, _ = train(state, batch, policy)
      jax.block_until_ready(evaluate(new_state.variables(), batch, policy))
    out[f"{wq}/{aq}"] = {"policies": num_policies, "train_step_traces": counts["train"],
                         "eval_step_traces": counts["eval"],
                         "seconds": round(time.perf_counter() - t0, 2)}
  return out


def run() -> dict:
  """Runs the benchmark; prints a summary and returns a JSON-able dict."""
  result = {"fake_quant": [], "backend": jax.default_backend()}
  for n in SIZES:
    r = _fake_quant_throughput(n)
    result["fake_quant"].append(r)
    line = (f"fake-quant {n:>10,} elements: {r['fake_quant_minmax_gbps']:.1f} GB/s min-max, "
            f"{r['fake_quant_static_range_gbps']:.1f} GB/s static range; x*1.0001 "
            f"{r['x_times_1.0001_gbps']:.1f} GB/s (ratios {r['minmax_vs_scale_bandwidth']:.2f}, "
            f"{r['static_vs_scale_bandwidth']:.2f})")
    if "torch_fake_quant_gbps" in r:
      line += (f"; torch {r['torch_fake_quant_gbps']:.1f} GB/s (static/torch "
               f"{r['static_vs_torch']:.2f}x, min-max/torch min-max "
               f"{r['minmax_vs_torch_minmax']:.2f}x)")
    print(line, flush=True)
  from experiments.bench import quant_codebook  # pylint: disable=g-import-not-at-top
  result["kmeans"] = quant_codebook.run()
  result["trace_counts"] = _trace_counts()
  for name, r in result["trace_counts"].items():
    print(f"traces across {r['policies']} policies ({name}): train step "
          f"{r['train_step_traces']}, eval step {r['eval_step_traces']}", flush=True)
  small, large = result["fake_quant"]
  result["targets"] = {
      "fake_quant_bandwidth_ratio_ge_0.5": bool(
          min(small["minmax_vs_scale_bandwidth"], large["minmax_vs_scale_bandwidth"]) >= 0.5),
      "one_trace_per_step": all(r["train_step_traces"] == 1 and r["eval_step_traces"] == 1
                                for r in result["trace_counts"].values()),
  }
  if "static_vs_torch" in small:
    result["targets"]["fake_quant_vs_torch_ge_1"] = bool(
        min(small["static_vs_torch"], large["static_vs_torch"]) >= 1.0)
  return result
