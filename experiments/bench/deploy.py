r"""Deployment on the CPU: images/s of the integer engine, fake-quant eval and onnxruntime.

  python -m experiments.bench deploy [--out=bench_deploy.json] [--quick]

The quickstart CNN (Fashion-MNIST's 28x28x1, 10 classes, batch 256) and
MobileNetV2 (224x224x3, 100 classes, batch 32, as `bench mobilenet`), each
random-initialised with the jobs' default quantizers (min-max weights,
calibrated fixed activation ranges) under a mixed policy (per-layer bits
drawn once from 2..8 with a fixed seed), on random images, on the CPU, each
model in a process of its own. Measured, per model:
  * fake-quant eval: the jitted `model.apply` of the fake-quantized model,
    what every accuracy of a job was measured with before the export stage;
  * integer engine: `haqjax.deploy.engine.run` of the integer graph
    (`haqjax.deploy.build`): int8 codes, int32 accumulation, fixed-point
    requantization, what a job's `test_top1` is now measured with;
  * onnxruntime: the exported QDQ `model.onnx` (`haqjax.deploy.onnx_export`)
    in an `InferenceSession` (CPUExecutionProvider, default threads and
    graph optimizations), skipped without the `export` extra;
as images/s at the median call with those at the slowest and fastest calls
(`timing.time_call`: the first call, which compiles or initialises, apart).
Also the seconds to build the integer graph, to write the ONNX model and to
create its session, and on the timed batch the share of predictions the
integer engine shares with fake-quant and with onnxruntime. The machine's
load average before and after each model is recorded: the CPU may be shared.

No target: the figures say what checking a model's integer accuracy costs
against its fake-quant accuracy, and what a runtime built for inference
gives. `--quick` (batch 4, 3 timed calls) is a smoke run whose numbers are
not comparable.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from experiments.bench import timing
from experiments.bench.mobilenet import mixed_policy

# Model -> (dataset it runs on, input shape, classes, batch size).
MODELS = {"quickstart_cnn": ("fashion_mnist", (28, 28, 1), 10, 256),
          "mobilenet_v2": ("imagenet2012", (224, 224, 3), 100, 32)}
REPEATS = 10
QUICK_BATCH_SIZE = 4
CALIBRATION_IMAGES = 64
RUNTIMES = ("fake_quant", "integer", "onnxruntime")


def _throughput(batch_size: int, t: timing.Timing) -> dict[str, Any]:
  return {"images_per_second": round(batch_size / t.median, 2),
          "images_per_second_slowest": round(batch_size / t.max, 2),
          "images_per_second_fastest": round(batch_size / t.min, 2),
          **t.to_dict("ms", 2)}


def _onnxruntime_session(graph) -> tuple[Any, dict[str, float]] | None:
  """An onnxruntime session of the graph's ONNX model, and the seconds to write
  the model and to create the session (None without the `export` extra)."""
  from haqjax.jobs import export  # pylint: disable=g-import-not-at-top
  if not (export.has_package("onnx") and export.has_package("onnxruntime")):
    return None
  import onnxruntime  # pylint: disable=g-import-not-at-top
  from haqjax.deploy import onnx_export  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  data = onnx_export.to_onnx(graph).SerializeToString()
  t1 = time.perf_counter()
  session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
  return session, {"onnx_export_seconds": round(t1 - t0, 2),
                   "onnxruntime_session_seconds": round(time.perf_counter() - t1, 2)}


def measure(model_name: str, batch_size: int, repeats: int) -> dict[str, Any]:
  """The three runtimes on `model_name`, in this process (on the CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from haqjax.deploy import build  # pylint: disable=g-import-not-at-top
  from haqjax.deploy import engine  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.nn.calibrate import calibrate  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top

  load_before = os.getloadavg()
  dataset, shape, classes, _ = MODELS[model_name]
  config = Config(model=model_name, dataset=dataset, mode="qat", policy="w8a8")
  model = trainer.build_model(config, classes)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(max(batch_size, CALIBRATION_IMAGES), *shape)).astype(np.float32)
  x = images[:batch_size]
  policy = mixed_policy(layer_table(model, (1, *shape)).names)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  variables = calibrate(model, variables, [images[:CALIBRATION_IMAGES]], policy)
  t0 = time.perf_counter()
  graph = build.build(model, variables, policy, images[:CALIBRATION_IMAGES])
  build_seconds = time.perf_counter() - t0

  fake_quant = jax.jit(lambda v, images, p: model.apply(v, images, policy=p))
  calls = {"fake_quant": lambda: fake_quant(variables, x, policy),
           "integer": lambda: engine.run(graph, x)}
  ort = _onnxruntime_session(graph)
  if ort is not None:
    name = ort[0].get_inputs()[0].name
    calls["onnxruntime"] = lambda: ort[0].run(None, {name: x})[0]
  result: dict[str, Any] = {
      "model": model_name, "input_shape": list(shape), "num_classes": classes,
      "batch_size": batch_size, "quantized_layers": len(policy),
      "w_bits": np.asarray(policy.w_bits).tolist(),
      "a_bits": np.asarray(policy.a_bits).tolist(),
      "build_seconds": round(build_seconds, 2),
      **(ort[1] if ort is not None else
         {"onnx_export_seconds": None, "onnxruntime_session_seconds": None})}
  predictions = {}
  for label in RUNTIMES:
    if label not in calls:
      result[label] = None
      continue
    t = timing.time_call(calls[label], repeats=repeats)
    result[label] = _throughput(batch_size, t)
    predictions[label] = np.argmax(np.asarray(calls[label]()), -1)
  result["integer_agrees_with_fake_quant"] = float(
      np.mean(predictions["integer"] == predictions["fake_quant"]))
  result["onnxruntime_agrees_with_integer"] = (
      float(np.mean(predictions["onnxruntime"] == predictions["integer"]))
      if "onnxruntime" in predictions else None)
  result["load_average_before"] = [round(v, 2) for v in load_before]
  result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
  return result


def _measure_in_child(model_name: str, batch_size: int, repeats: int) -> dict[str, Any]:
  """`measure` in a fresh process, so that one model's compiled code and
  threads do not weigh on the other's."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(measure, (model_name, batch_size, repeats))


def _cell(row: dict[str, Any] | None) -> str:
  if row is None:
    return "n/a (pip install 'haqjax[export]')"
  return (f"{row['images_per_second']:.1f} ({row['images_per_second_slowest']:.1f}"
          f"-{row['images_per_second_fastest']:.1f})")


def table(rows: list[dict[str, Any]]) -> str:
  """The printed table: images/s at the median call (slowest-fastest) per runtime."""
  lines = ["| model | batch | fake-quant eval | integer engine | onnxruntime | "
           "first call (s): fake-quant / integer / onnxruntime |",
           "|---|---|---|---|---|---|"]
  for row in rows:
    first = " / ".join("n/a" if row[k] is None else f"{row[k]['first_call_seconds']:.1f}"
                       for k in RUNTIMES)
    lines.append(f"| {row['model']} | {row['batch_size']} | {_cell(row['fake_quant'])} | "
                 f"{_cell(row['integer'])} | {_cell(row['onnxruntime'])} | {first} |")
  return "\n".join(lines)


def run(quick: bool = False) -> dict[str, Any]:
  """Runs the benchmark; prints a table and returns a JSON-able dict.

  Args:
    quick: batch `QUICK_BATCH_SIZE` and `timing.MIN_REPEATS` timed calls, a
      smoke run.
  """
  import jax  # pylint: disable=g-import-not-at-top
  repeats = timing.MIN_REPEATS if quick else REPEATS
  rows = []
  for name, (_, _, _, batch_size) in MODELS.items():
    rows.append(_measure_in_child(name, QUICK_BATCH_SIZE if quick else batch_size,
                                  repeats))
    row = rows[-1]
    print(f"{name}: integer graph built in {row['build_seconds']:.1f} s; predictions "
          f"integer = fake-quant {row['integer_agrees_with_fake_quant']:.1%}"
          + ("" if row["onnxruntime_agrees_with_integer"] is None else
             f", onnxruntime = integer {row['onnxruntime_agrees_with_integer']:.1%}")
          + f"; load average {row['load_average_before'][0]:.2f} before, "
          f"{row['load_average_after'][0]:.2f} after", flush=True)
  print("images/s at the median call (slowest-fastest):")
  print(table(rows), flush=True)
  return {"jax": jax.__version__, "device": "cpu", "quick": quick, "repeats": repeats,
          "models": rows}
