r"""Hardware cost-model benchmark: speed of the cost functions, BISMO fit.

  python -m experiments.bench hardware [--out=bench_hardware.json]

Measures, on this machine (JAX on its default backend), as median times with
their min and max, compilation apart:
  * the [53, 8, 8] MobileNetV2 cost tensor of each target;
  * layer-configuration evaluations per second (policies x layers / s, at the
    median time) of `batched_policy_cost` on 10,000 MobileNetV2 policies in
    one vmapped call;
  * `bismo-cloud` against HAQ's shipped table (../shared/data/haq): mean
    absolute % error, Spearman, network-level error at uniform W4A4..W8A8;
  * Bit Fusion against its simulator's runs (tests/data/bitfusion_reference.json,
    ResNet-18/20 and MobileNetV2 layers, (w, a) in {2, 4, 8}^2, batch 1 and
    16): mean and max relative error of total cycles and energy over the conv
    and FC layers and over the depthwise ones, for the 'tiled' memory model
    and the 'stream' estimate;
  * the systolic array's SCALE-Sim scratchpad model against the `scalesim`
    package (when installed; `haqjax.hardware.scalesim_reference`): mean and
    max relative error of total cycles, of the roofline's cycles and of the
    DRAM words per operand, per dataflow, over its fixed cases and over
    `SAMPLED` random layers and arrays (`sample_cases`).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from experiments.bench import timing

HAQ_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                         "shared", "data", "haq",
                         "qmobilenetv2_imagenet100_batch16_latency_table.npy")
BITFUSION_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                   "tests", "data", "bitfusion_reference.json")
TARGETS = ("bismo-edge", "bismo-cloud", "bitfusion", "systolic")
POLICIES = 10_000
# Random layers and arrays of `scalesim_reference.sample_cases` (seed 0).
SAMPLED = 60


def run() -> dict:
  """Runs the benchmark; prints a summary and returns a JSON-able dict."""
  from haqjax import hardware  # pylint: disable=g-import-not-at-top
  from haqjax.hardware import bitfusion_reference  # pylint: disable=g-import-not-at-top
  from haqjax.hardware import calibration  # pylint: disable=g-import-not-at-top

  result = {"backend": jax.default_backend(), "tensor_ms": {},
            "evals_per_s": {}, "policies": POLICIES, "times_ms": {}}
  rng = np.random.default_rng(0)
  names = {n: n for n in TARGETS}
  if os.path.exists(HAQ_TABLE):
    names["table"] = "table:" + HAQ_TABLE
  for name, spec in names.items():
    target = hardware.get_target(spec)
    layers = hardware.from_model("mobilenet_v2", num_classes=100,
                                 batch=target.batch)
    n = len(layers)
    tensor = lambda: hardware.cost_tensor(target, layers, metric="latency")  # pylint: disable=cell-var-from-loop
    t = timing.time_call(tensor, repeats=20)
    result["tensor_ms"][name] = t.median_ms
    w = rng.integers(1, 9, size=(POLICIES, n)).astype(np.float32)
    a = rng.integers(1, 9, size=(POLICIES, n)).astype(np.float32)
    w, a = jax.device_put(w), jax.device_put(a)
    batched = lambda: hardware.batched_policy_cost(target, layers, w, a)  # pylint: disable=cell-var-from-loop
    t_batched = timing.time_call(batched, repeats=5)
    result["evals_per_s"][name] = POLICIES * n / t_batched.median
    result["times_ms"][name] = {"cost_tensor": t.to_dict("ms", 4),
                                "batched_policy_cost": t_batched.to_dict("ms", 3)}
  if os.path.exists(HAQ_TABLE):
    layers = hardware.from_model("mobilenet_v2", num_classes=100, batch=16)
    pred = hardware.cost_tensor(hardware.BISMO_CLOUD, layers, metric="cycles")
    err = calibration.table_errors(pred, np.load(HAQ_TABLE))
    err["per_layer_mean_abs_pct_error"] = [round(e, 2) for e in err["per_layer_mean_abs_pct_error"]]
    result["bismo_cloud_vs_haq_table"] = err
  if os.path.exists(BITFUSION_REFERENCE):
    result["bitfusion_vs_simulator"] = {
        memory: {k: v for k, v in bitfusion_reference.agreement(
            BITFUSION_REFERENCE, hardware.BitFusion(memory=memory))["summary"].items()
                 if k in ("conv_fc", "depthwise")}
        for memory in ("tiled", "stream")}
  try:
    from haqjax.hardware import scalesim_reference  # pylint: disable=g-import-not-at-top
    import scalesim  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print("scalesim is not installed (pip install -e '.[test]'): its comparison is skipped")
  else:
    for key, cases in (("systolic_vs_scalesim", scalesim_reference.CASES),
                       ("systolic_vs_scalesim_sampled",
                        scalesim_reference.sample_cases(SAMPLED))):
      summary, rows = scalesim_reference.agreement(cases)
      result[key] = {"cases": len(rows), **{
          group: {k: {"mean": m, "max": x} for k, (m, x) in errs.items()}
          for group, errs in summary.items()}}
  print(f"backend: {result['backend']}; MobileNetV2 (53 layers), {POLICIES} policies")
  print(f"{'target':<12} {'[53,8,8] ms':>11} {'(min-max)':<15} {'layer-evals/s':>14}")
  for name in names:
    t = result["times_ms"][name]["cost_tensor"]
    spread = f"({t['min_ms']:.3f}-{t['max_ms']:.3f})"
    print(f"{name:<12} {t['median_ms']:>11.3f} {spread:<15} "
          f"{result['evals_per_s'][name]:>14.3g}")
  if "bismo_cloud_vs_haq_table" in result:
    e = result["bismo_cloud_vs_haq_table"]
    net = ", ".join(f"{k} {v:+.2f}%" for k, v in e["network_pct_error"].items())
    print(f"bismo-cloud vs HAQ table: mean |err| {e['mean_abs_pct_error']:.2f}%, "
          f"Spearman {e['spearman']:.4f}, network {net}")
  for memory, parts in result.get("bitfusion_vs_simulator", {}).items():
    for part, e in parts.items():
      print(f"bitfusion ({memory}) vs simulator, {part} ({e['runs']} runs): cycles "
            f"mean {100 * e['cycles_mean_err']:.2f}% max {100 * e['cycles_max_err']:.2f}%, "
            f"energy mean {100 * e['energy_mean_err']:.2f}% max {100 * e['energy_max_err']:.2f}%")
  for key, label in (("systolic_vs_scalesim", "fixed"),
                     ("systolic_vs_scalesim_sampled", "sampled")):
    r = result.get(key, {})
    for group in ("os", "ws", "is", "all"):
      if group in r:
        e = r[group]
        print(f"systolic (user bandwidth) vs scalesim, {label}, {group} ({r['cases']} cases "
              "in all): " + ", ".join(
                  f"{k} mean {100 * e[k]['mean']:.1f}% max {100 * e[k]['max']:.1f}%"
                  for k in ("cycles", "roofline", "ifmap", "filter", "ofmap")))
  return result

