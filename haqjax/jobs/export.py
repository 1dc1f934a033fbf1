"""The export stage: a finished run's integer model, scored and written out.

    python -m experiments.imagenet --mode=export --init_from=RUN --workdir=OUT

`export_run(config, workdir)` reads the quantized run in `config.init_from`
(a `qat` or `ptq` workdir, or a search's `finetune/`: its `config.json`,
`policy.json` and latest checkpoint), lowers the model to the integer graph
(`haqjax.deploy.build`), scores it on the test split with the integer engine
and, when the `onnx` and `onnxruntime` packages are installed (the `export`
extra), with onnxruntime on the exported model, and writes `WORKDIR/export/`:

  model.onnx        QDQ form (`haqjax.deploy.onnx_export`)
  model.stablehlo   the integer engine serialized by `jax.export`
  encodings.json    per tensor bit-width, scale, offset (AIMET's fields)
  weights.bin       the kernels bit-packed at their bits, with their scales
  results.json      both test top-1s, the fake-quant one beside them, sizes

`results.json` is written last; its top-1s are percentages, as the runs'. The packed size is compared with
`sum(bits x params) / 8` plus the scales and biases, which it should equal
to within 1% (the header aside).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from typing import Any

import numpy as np

from haqjax import data as haq_data
from haqjax import io as haq_io
from haqjax.deploy import agreement
from haqjax.deploy import build as build_lib
from haqjax.deploy import engine
from haqjax.deploy import onnx_export
from haqjax.deploy import packing
from haqjax.policy import load_policy
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import trainer
from haqjax.train.config import Config

# Training images whose range bounds the float input (see `deploy.build`).
EXAMPLE_IMAGES = 64


def _read_run(run: str) -> tuple[Config, str]:
  """The run's config and its policy file, or a one-line error naming `run`."""
  for name in ("config.json", "policy.json"):
    if not os.path.exists(os.path.join(run, name)):
      raise ValueError(f"init_from={run!r} has no {name}; allowed: the workdir of a "
                       "finished qat or ptq run, or a search's finetune/ folder")
  return Config.load(os.path.join(run, "config.json")), os.path.join(run, "policy.json")


def onnxruntime_top1(path: str, split, batch_size: int) -> float | None:
  """Top-1 (%) of the ONNX model at `path` run by onnxruntime; None without it."""
  if importlib.util.find_spec("onnxruntime") is None:
    return None
  import onnxruntime  # pylint: disable=g-import-not-at-top
  options = onnxruntime.SessionOptions()
  session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  correct = total = 0.0
  for batch in haq_data.batches(split, batch_size=batch_size, shuffle=False,
                                drop_remainder=False):
    logits = session.run(None, {name: np.asarray(batch["image"], np.float32)})[0]
    mask = np.asarray(batch.get("mask", np.ones(len(logits))), np.float64)
    correct += float(np.sum((np.argmax(logits, -1) == np.asarray(batch["label"])) * mask))
    total += float(np.sum(mask))
  return 100.0 * correct / total if total else None


def packed_size_check(graph) -> dict[str, float]:
  """The packed weights' bytes against `sum(bits x params) / 8` plus scales and biases."""
  tensors = packing.graph_weights(graph)
  packed = sum(packing.tensor_nbytes(t) for t in tensors)
  ideal = 0.0
  for t in tensors:
    ideal += (np.size(t.codes) + np.size(t.zero_point)) * t.bits / 8 + 4 * np.size(t.scale)
  return {"packed_weight_bytes": float(packed), "ideal_weight_bytes": ideal,
          "packed_over_ideal": packed / ideal if ideal else None}


def export_model(model, variables: dict[str, Any], policy, splits, workdir: str, *,
                 batch_size: int, fake_quant_top1: float | None = None) -> dict[str, Any]:
  """Builds, scores and writes the integer model of `model` at `policy`.

  Returns:
    The figures written to `workdir/export/results.json`.
  """
  example = next(iter(haq_data.batches(splits.train, batch_size=min(
      EXAMPLE_IMAGES, len(splits.train)), shuffle=False, drop_remainder=False)))["image"]
  graph = build_lib.build(model, variables, policy, np.asarray(example))
  integer_top1 = 100.0 * agreement.evaluate(graph, splits.test, batch_size)
  sizes = onnx_export.export_all(graph, workdir, functools.partial(engine.run, graph))
  folder = os.path.join(workdir, "export")
  ort_top1 = (onnxruntime_top1(os.path.join(folder, "model.onnx"), splits.test, batch_size)
              if "model.onnx" in sizes else None)
  results = {"integer_test_top1": integer_top1, "onnxruntime_test_top1": ort_top1,
             "fake_quant_test_top1": fake_quant_top1, "files": sizes,
             **packed_size_check(graph)}
  haq_io.write_json(os.path.join(folder, "results.json"), results)
  return results


def export_run(config: Config, workdir: str) -> dict[str, Any]:
  """`--mode=export`: the integer model of the run in `config.init_from`."""
  if not config.init_from:
    raise ValueError("init_from is empty; allowed: the workdir of a finished qat or "
                     "ptq run (mode=export exports it)")
  run_config, policy_path = _read_run(config.init_from)
  splits = haq_data.load(run_config.dataset, data_dir=config.data_dir or run_config.data_dir,
                         manual_dir=config.manual_dir or run_config.manual_dir,
                         val_size=run_config.val_size, split_seed=run_config.split_seed)
  model = trainer.build_model(run_config, splits.spec.num_classes)
  policy = load_policy(policy_path)
  variables = ckpt_lib.restore_variables(config.init_from)
  fake_quant = None
  results_path = os.path.join(config.init_from, "results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      fake_quant = json.load(f).get("test_top1")
  os.makedirs(workdir, exist_ok=True)
  results = export_model(model, variables, policy, splits, workdir,
                         batch_size=config.eval_batch_size, fake_quant_top1=fake_quant)
  return {"mode": "export", "model": run_config.model, "dataset": run_config.dataset,
          "test_top1": results["integer_test_top1"], "test_top5": None,
          "val_top1": None, "steps": 0, **results}
