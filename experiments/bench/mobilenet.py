r"""ImageNet-size models on this machine: QAT and FP32 steps of MobileNetV2 and ResNet-18.

  python -m experiments.bench mobilenet [--out=bench_mobilenet.json] [--quick]

The workload of HAQ's search episodes: MobileNetV2 (and ResNet-18) at
224x224x3, 100 classes, batch 32, on random images. Measures per model, each
in a process of its own:
  * training-step throughput, images/s at the median step with those at the
    slowest and fastest steps, in floating point and under a mixed policy
    (QAT; per-layer weight and activation bits drawn once from 2..8 with a
    fixed seed) with the trainer's default quantizers (`Config`'s
    `--weight_quantizer` and `--act_quantizer`: min-max weights, fixed
    activation ranges calibrated on the batch, as QAT calibrates them
    before training and as HAQ's own QAT keeps them);
  * evaluation-step throughput, the same two ways;
  * the first training step, split into tracing, lowering, XLA compilation
    and the first run;
  * the CPU seconds of tracing, lowering and XLA compilation of the QAT
    training step, median, min and max over `COMPILE_REPEATS` fresh
    compilations with JAX's caches cleared and the persistent compilation
    cache off (CPU seconds, so that other processes' load counts less than
    in wall-clock time);
  * the peak resident memory of the process.
The machine's load average before and after each model is recorded beside
the numbers: the CPU may be shared, and the steps scale with what is free.

Targets on the 2-core CPU, against the original HAQ (PyTorch 2.13 on the same
machine, out of the box: 9.5 images/s QAT training, 57 images/s evaluation of
MobileNetV2): mixed-policy QAT training >= 10 images/s, evaluation >= 60
images/s, first QAT step <= 20 s. `--quick` (batch 4, 3 timed steps) is a
smoke run whose numbers are not comparable.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import resource
import time
from typing import Any

from experiments.bench import timing

MODELS = ("mobilenet_v2", "resnet18")
IMAGE_SHAPE = (224, 224, 3)
NUM_CLASSES = 100
BATCH_SIZE = 32
REPEATS = 5
COMPILE_REPEATS = timing.MIN_REPEATS
QUICK_BATCH_SIZE = 4
POLICY_SEED = 0

# The original HAQ (PyTorch 2.13 on CPU, this machine, MobileNetV2 batch 32),
# images/s: out of the box, and with glibc keeping freed memory.
PYTORCH_REFERENCE = {"qat_train": 9.5, "qat_eval": 57.0, "qat_train_tuned_malloc": 27.9,
                     "qat_eval_tuned_malloc": 97.0}
TARGETS = {"qat_train_images_per_second": 10.0, "qat_eval_images_per_second": 60.0,
           "qat_first_step_seconds": 20.0}


def mixed_policy(names: tuple[str, ...]) -> Any:
  """Per-layer weight and activation bits drawn from 2..8 with `POLICY_SEED`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(POLICY_SEED)
  return Policy.create(names, rng.integers(2, 9, len(names)),
                       rng.integers(2, 9, len(names)))


def _staged(fn, *args) -> tuple[Any, dict[str, float]]:
  """`fn`'s executable for `args`, and the seconds of tracing, lowering and compiling."""
  t0 = time.perf_counter()
  traced = fn.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  return compiled, {"trace_seconds": round(t1 - t0, 2), "lower_seconds": round(t2 - t1, 2),
                    "compile_seconds": round(t3 - t2, 2)}


def _compile_cost(make_fn, *args, repeats: int = COMPILE_REPEATS) -> dict[str, Any]:
  """CPU seconds of tracing, lowering and compiling `make_fn()` for `args`, from scratch.

  Each repeat clears JAX's in-memory caches and jits anew; the persistent
  compilation cache is turned off for the process, so every repeat runs
  XLA. Returns `{trace,lower,compile}_cpu_seconds`, each `timing.Timing`'s
  median, min and max in seconds.
  """
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  samples = {"trace": [], "lower": [], "compile": []}
  for _ in range(repeats):
    jax.clear_caches()
    t0 = time.process_time()
    traced = make_fn().trace(*args)
    t1 = time.process_time()
    lowered = traced.lower()
    t2 = time.process_time()
    lowered.compile()
    t3 = time.process_time()
    for stage, seconds in zip(samples, (t1 - t0, t2 - t1, t3 - t2)):
      samples[stage].append(seconds)
  return {f"{stage}_cpu_seconds": timing.summarize(v).to_dict("s", 2)
          for stage, v in samples.items()}


def _throughput(batch_size: int, t: timing.Timing) -> dict[str, Any]:
  return {"images_per_second": round(batch_size / t.median, 2),
          "images_per_second_slowest": round(batch_size / t.max, 2),
          "images_per_second_fastest": round(batch_size / t.min, 2),
          **t.to_dict("ms", 1)}


def measure(model_name: str, batch_size: int, repeats: int) -> dict[str, Any]:
  """Train and eval steps of `model_name`, FP32 and mixed QAT, in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax import models  # pylint: disable=g-import-not-at-top
  from haqjax import quant  # pylint: disable=g-import-not-at-top
  from haqjax.nn import calibrate as calibrate_lib  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  from haqjax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  load_before = os.getloadavg()
  defaults = Config()
  model = models.create(model_name, num_classes=NUM_CLASSES, quant_scheme=quant.QuantScheme(
      weight=quant.weight_quantizer(defaults.weight_quantizer),
      act=quant.act_quantizer(defaults.act_quantizer)))
  tx = steps_lib.make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9,
                                weight_decay=1e-4)
  shape = (batch_size, *IMAGE_SHAPE)
  state = steps_lib.init_state(jax.random.key(0), model, tx, shape)
  key_x, key_y = jax.random.split(jax.random.key(1))
  batch = {"image": jax.random.normal(key_x, shape),
           "label": jax.random.randint(key_y, (batch_size,), 0, NUM_CLASSES)}
  policy = mixed_policy(layer_table(model, (1, *IMAGE_SHAPE)).names)
  calibrated = calibrate_lib.calibrate(model, state.variables(), [batch["image"]], policy)
  state = state.replace(params=calibrated["params"], opt_state=tx.init(calibrated["params"]))
  result = {"model": model_name, "input_shape": list(IMAGE_SHAPE),
            "num_classes": NUM_CLASSES, "batch_size": batch_size,
            "quantized_layers": len(policy),
            "quantizers": {"weight": defaults.weight_quantizer,
                           "activation": defaults.act_quantizer}}
  train = jax.jit(functools.partial(steps_lib.train_step, model, tx), donate_argnums=0)
  evaluate = jax.jit(functools.partial(steps_lib.eval_step, model))
  for label, pol in (("qat", policy), ("fp32", None)):
    compiled, stages = _staged(train, state, batch, pol)
    current = [jax.tree.map(lambda a: a.copy(), state)]  # Donated step by step.

    def train_once(compiled=compiled, pol=pol):
      current[0], metrics = compiled(current[0], batch, pol)
      return current[0], metrics

    t = timing.time_call(train_once, repeats=repeats)
    result[f"{label}_train"] = {
        **_throughput(batch_size, t), **stages,
        "first_step_seconds": round(sum(stages.values()) + t.first_seconds, 2)}
    compiled, stages = _staged(evaluate, state.variables(), batch, pol)
    t = timing.time_call(lambda c=compiled, p=pol: c(state.variables(), batch, p),
                         repeats=repeats)
    result[f"{label}_eval"] = {**_throughput(batch_size, t), **stages}
    train_row, eval_row = result[f"{label}_train"], result[f"{label}_eval"]
    print(f"{model_name:>13} {label:>4}: train {train_row['images_per_second']:6.2f} images/s "
          f"(slowest {train_row['images_per_second_slowest']:.2f}, fastest "
          f"{train_row['images_per_second_fastest']:.2f}), eval "
          f"{eval_row['images_per_second']:6.2f} images/s (slowest "
          f"{eval_row['images_per_second_slowest']:.2f}, fastest "
          f"{eval_row['images_per_second_fastest']:.2f}); first train step "
          f"{train_row['first_step_seconds']:.1f} s (trace {train_row['trace_seconds']:.1f}, "
          f"lower {train_row['lower_seconds']:.1f}, compile "
          f"{train_row['compile_seconds']:.1f}, run {t.first_seconds:.1f})", flush=True)
  cost = _compile_cost(
      lambda: jax.jit(functools.partial(steps_lib.train_step, model, tx)), state, batch, policy)
  result["qat_train_compile"] = cost
  print(f"{model_name:>13}  qat: train step from scratch, CPU s, median (min, max) of "
        f"{COMPILE_REPEATS}: " + ", ".join(
            f"{stage.split('_')[0]} {row['median_s']:.1f} ({row['min_s']:.1f}, "
            f"{row['max_s']:.1f})" for stage, row in cost.items()), flush=True)
  result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  result["load_average_before"] = [round(v, 2) for v in load_before]
  result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
  return result


def _measure_in_child(model_name: str, batch_size: int, repeats: int) -> dict[str, Any]:
  """`measure` in a fresh process, so that its peak RSS is the model's alone."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(measure, (model_name, batch_size, repeats))


def _targets_met(row: dict[str, Any]) -> dict[str, bool]:
  return {"qat_train_images_per_second": row["qat_train"]["images_per_second"]
          >= TARGETS["qat_train_images_per_second"],
          "qat_eval_images_per_second": row["qat_eval"]["images_per_second"]
          >= TARGETS["qat_eval_images_per_second"],
          "qat_first_step_seconds": row["qat_train"]["first_step_seconds"]
          <= TARGETS["qat_first_step_seconds"]}


def run(quick: bool = False) -> dict[str, Any]:
  """Runs the benchmark; prints a summary and returns a JSON-able dict.

  Args:
    quick: batch `QUICK_BATCH_SIZE` and `timing.MIN_REPEATS` timed steps, a
      smoke run.
  """
  import jax  # pylint: disable=g-import-not-at-top
  batch_size = QUICK_BATCH_SIZE if quick else BATCH_SIZE
  repeats = timing.MIN_REPEATS if quick else REPEATS
  rows = [_measure_in_child(m, batch_size, repeats) for m in MODELS]
  for row in rows:
    print(f"{row['model']:>13}: peak RSS {row['peak_rss_mib']} MiB; load average "
          f"{row['load_average_before'][0]:.2f} before, {row['load_average_after'][0]:.2f} "
          "after", flush=True)
  result = {"jax": jax.__version__, "backend": jax.default_backend(), "quick": quick,
            "pytorch_reference_mobilenet_v2": PYTORCH_REFERENCE, "targets": TARGETS,
            "models": rows}
  if not quick:
    result["mobilenet_v2_targets_met"] = _targets_met(rows[0])
  return result
