"""The export stage: a quantized run's integer model, scored and written out.

Every job that ends with a quantized model (`qat`, `ptq`, `rl`, `gumbel`,
`hawq`) runs this stage last unless `--noexport`, and `--mode=export` runs it
on a finished run:

    python -m experiments.imagenet --mode=export --init_from=RUN --workdir=OUT

It lowers the model to the integer graph (`haqjax.deploy.build`), scores it on
the test split with the integer engine and, when the `onnx` and `onnxruntime`
packages are installed (the `export` extra), with onnxruntime on the exported
model, and writes `WORKDIR/export/`:

  model.onnx        QDQ form (`haqjax.deploy.onnx_export`)
  model.stablehlo   the integer engine serialized by `jax.export`
  encodings.json    per tensor bit-width, scale, offset (AIMET's fields)
  weights.bin       the kernels bit-packed at their bits, with their scales
  results.json      both test top-1s, the fake-quant one beside them, sizes

Each file is written atomically (a temporary name, then a rename), and
`results.json` last; its top-1s are percentages, as the runs'. A file that
cannot be written (the `onnx` package missing, an op with no ONNX
translation) is left out with one line on stderr saying why (an earlier
export's file of that name is removed), and the others are still written. When the integer engine cannot express the model (its
`ValueError` names the layer), `results.json` holds that line as
`integer_error` and no files: the job reports its fake-quant figures. The
packed size is compared with `sum(bits x params) / 8` plus the scales and
biases, which it should equal to within 1% (the header aside).

The job's own results (`final_top1`) then name the integer model's test top-1
`test_top1`, with `test_top1_fake_quant` beside it; a qat or ptq run's
`results.json` is rewritten so (atomically), a search's is written so.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from haqjax import data as haq_data
from haqjax import io as haq_io
from haqjax.deploy import agreement
from haqjax.deploy import build as build_lib
from haqjax.deploy import encodings
from haqjax.deploy import engine
from haqjax.deploy import onnx_export
from haqjax.deploy import packing
from haqjax.deploy import stablehlo
from haqjax.policy import load_policy
from haqjax.ptq import pipeline
from haqjax.ptq import runner as ptq_runner
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import trainer
from haqjax.train.config import Config

EXPORT_DIR = "export"
# The deployment files of `write_files`, results.json aside.
FILES = ("model.onnx", "model.stablehlo", "encodings.json", "weights.bin")
INSTALL = "pip install 'haqjax[export]'"
# Training images whose range bounds the float input (see `deploy.build`).
EXAMPLE_IMAGES = 64


def has_package(name: str) -> bool:
  """Whether the optional package `name` (onnx, onnxruntime) is installed."""
  return importlib.util.find_spec(name) is not None


def read_run(run: str) -> tuple[Config, str]:
  """The run's config and its policy file, or a one-line error naming `run`."""
  for name in ("config.json", "policy.json"):
    if not os.path.exists(os.path.join(run, name)):
      raise ValueError(f"init_from={run!r} has no {name}; allowed: the workdir of a "
                       "finished qat or ptq run, or a search's finetune/ folder")
  return Config.load(os.path.join(run, "config.json")), os.path.join(run, "policy.json")


def onnxruntime_top1(path: str, split, batch_size: int) -> float | None:
  """Top-1 (%) of the ONNX model at `path` run by onnxruntime; None without it."""
  if not has_package("onnxruntime"):
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


def first_line(error: BaseException) -> str:
  """An exception as one line: its message's first line, or its type."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def remove_files(folder: str, names) -> None:
  """Removes files `names` from `folder` where they exist (an earlier export's)."""
  for name in names:
    path = os.path.join(folder, name)
    if os.path.exists(path):
      os.remove(path)


def write_files(graph, folder: str) -> tuple[dict[str, int], dict[str, str]]:
  """Writes the deployment files of `graph` into `folder`, each on its own.

  Returns:
    `(sizes, skipped)`: bytes of each file written, and why each other one
    was not (one line each, also printed on stderr; an earlier export's file
    of that name is removed).
  """
  example = jax.ShapeDtypeStruct((1, *graph.input_shape), np.float32)
  writers = {
      "model.onnx": lambda path: onnx_export.save_onnx(path, graph),
      "model.stablehlo": lambda path: stablehlo.save_stablehlo(
          path, functools.partial(engine.run, graph), example, symbolic_batch=True),
      "encodings.json": lambda path: encodings.save_encodings(path, graph),
      "weights.bin": lambda path: packing.save_packed(path, packing.graph_weights(graph)),
  }
  sizes, skipped = {}, {}
  for name, write in writers.items():
    if name == "model.onnx" and not has_package("onnx"):
      skipped[name] = f"the onnx package is not installed ({INSTALL})"
      print(f"export: model.onnx and its onnxruntime test top-1 skipped: the onnx "
            f"package is not installed; {INSTALL} adds them", file=sys.stderr, flush=True)
      continue
    try:
      sizes[name] = write(os.path.join(folder, name))
    except Exception as e:  # pylint: disable=broad-except
      # One deliverable failing leaves the others and the scores.
      skipped[name] = f"{type(e).__name__}: {first_line(e)}"
      print(f"export: {name} not written: {skipped[name]}", file=sys.stderr, flush=True)
  remove_files(folder, skipped)
  return sizes, skipped


def export_model(model, variables: dict[str, Any], policy, splits, workdir: str, *,
                 batch_size: int, fake_quant_top1: float | None = None) -> dict[str, Any]:
  """Builds, scores and writes the integer model of `model` at `policy`.

  Returns:
    The figures written to `workdir/export/results.json`: the integer,
    onnxruntime and fake-quant test top-1 (None where not measured), the
    files written and skipped, the packed size, the policy, and
    `integer_error` (the engine's error line when it cannot express the
    model, else None).
  """
  folder = os.path.join(workdir, EXPORT_DIR)
  layers = policy.to_dict()["layers"]
  example = next(iter(haq_data.batches(splits.train, batch_size=min(
      EXAMPLE_IMAGES, len(splits.train)), shuffle=False, drop_remainder=False)))["image"]
  results: dict[str, Any] = {
      "integer_test_top1": None, "onnxruntime_test_top1": None,
      "fake_quant_test_top1": fake_quant_top1, "integer_error": None, "files": {},
      "skipped": {}, "policy": layers}
  remove_files(folder, ["results.json"])  # Until this export's is written.
  try:
    graph = build_lib.build(model, variables, policy, np.asarray(example))
  except ValueError as e:
    results["integer_error"] = first_line(e)
    print(f"export: no integer model ({results['integer_error']}); the fake-quant "
          "figures are reported", file=sys.stderr, flush=True)
    remove_files(folder, FILES)
    haq_io.write_json(os.path.join(folder, "results.json"), results)
    return results
  results["integer_test_top1"] = 100.0 * agreement.evaluate(graph, splits.test, batch_size)
  results["files"], results["skipped"] = write_files(graph, folder)
  if "model.onnx" in results["files"]:
    if has_package("onnxruntime"):
      results["onnxruntime_test_top1"] = onnxruntime_top1(
          os.path.join(folder, "model.onnx"), splits.test, batch_size)
    else:
      results["skipped"]["onnxruntime_test_top1"] = (
          f"the onnxruntime package is not installed ({INSTALL})")
      print(f"export: the onnxruntime test top-1 of model.onnx skipped: the onnxruntime "
            f"package is not installed; {INSTALL} adds it", file=sys.stderr, flush=True)
  results.update(packed_size_check(graph))
  haq_io.write_json(os.path.join(folder, "results.json"), results)
  return results


def read_export(workdir: str, policy, fake_quant_top1: float | None
                ) -> dict[str, Any] | None:
  """The finished export in `workdir/export/` of this model, or None.

  The export is of this model when it holds the same policy and the same
  fake-quant test top-1 (a model trained again would not be read back).
  """
  path = os.path.join(workdir, EXPORT_DIR, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    done = json.load(f)
  same = (done.get("policy") == policy.to_dict()["layers"]
          and done.get("fake_quant_test_top1") == fake_quant_top1)
  return done if same else None


def export_finished(run: str, workdir: str, splits, *, batch_size: int,
                    fake_quant_top1: float | None, reuse: bool = True) -> dict[str, Any]:
  """The integer model of the QAT run in folder `run`, exported to `workdir/export/`.

  Args:
    run: a finished qat run (`config.json`, `policy.json`, a checkpoint):
      a qat workdir or a search's `finetune/`.
    workdir: where `export/` goes (`run` itself, or the search's workdir).
    splits: the dataset.
    batch_size: of the integer engine's and onnxruntime's test batches.
    fake_quant_top1: the run's test top-1, recorded beside.
    reuse: read back a finished export of the same policy instead of
      redoing it (a rerun of a job never redoes a finished stage).
  """
  run_config, policy_path = read_run(run)
  policy = load_policy(policy_path)
  done = read_export(workdir, policy, fake_quant_top1) if reuse else None
  if done is not None:
    return done
  model = trainer.build_model(run_config, splits.spec.num_classes)
  return export_model(model, ckpt_lib.restore_variables(run), policy, splits, workdir,
                      batch_size=batch_size, fake_quant_top1=fake_quant_top1)


def ptq_model(config: Config, splits, policy):
  """The PTQ run of `config` again: `(model, variables)` of the quantized network.

  `haqjax.ptq.runner` keeps no checkpoint of its result, so exporting a
  finished PTQ run (`--mode=export`) repeats the flow with the same key,
  calibration batches and options, which gives the same variables. A `ptq`
  job hands its own result to `finish_run` instead.
  """
  model = trainer.build_model(config.replace(mode="train"), splits.spec.num_classes)
  result = pipeline.ptq(jax.random.key(config.seed), model,
                        jax.tree.map(jnp.asarray, ckpt_lib.restore_variables(config.init_from)),
                        ptq_runner.calibration_batches(splits, config), policy,
                        ptq_runner.options_from_config(config))
  return result.model, result.variables


def failure(error: Exception) -> dict[str, Any]:
  """The figures of an export stage that raised: no integer model, and why.

  A job's export stage runs after its fine-tune or PTQ has finished and been
  saved; a failure there (a bug, a full disk) is reported, with the
  fake-quant figures, instead of ending the job without its results. A
  rerun tries again.
  """
  line = f"export failed: {type(error).__name__}: {first_line(error)}"
  print(f"{line}; the fake-quant figures are reported", file=sys.stderr, flush=True)
  return {"integer_test_top1": None, "onnxruntime_test_top1": None, "integer_error": line}


def final_top1(fake_quant: dict[str, Any], exported: dict[str, Any] | None
               ) -> dict[str, Any]:
  """The test top-1 keys of a job's results: the integer model's when there is one.

  Args:
    fake_quant: the fake-quantized model's results (`test_top1`).
    exported: `export_model`'s results, or None when the job exported nothing.

  Returns:
    `test_top1` (the integer model's, else the fake-quant one),
    `test_top1_fake_quant`, `test_top1_onnxruntime`, `test_top1_source`
    ('integer' or 'fake_quant'), `integer_error` (why there is no integer
    figure: the engine's error line, or the export's failure; None when
    there is one or nothing was exported) and `export` (the folder written,
    relative to the workdir, or None).
  """
  fake = fake_quant.get("test_top1_fake_quant", fake_quant["test_top1"])
  exported = exported or {}
  integer = exported.get("integer_test_top1")
  return {"test_top1": fake if integer is None else integer,
          "test_top1_fake_quant": fake,
          "test_top1_onnxruntime": exported.get("onnxruntime_test_top1"),
          "test_top1_source": "fake_quant" if integer is None else "integer",
          "integer_error": exported.get("integer_error"),
          "export": EXPORT_DIR if "files" in exported else None}


def finish_run(config: Config, workdir: str, results: dict[str, Any],
               quantized: tuple[Any, dict[str, Any]] | None = None) -> dict[str, Any]:
  """The last stage of a finished `qat` or `ptq` run in `workdir`.

  Exports its integer model to `workdir/export/` and rewrites its
  `results.json` (atomically) with `final_top1`'s keys.

  Args:
    config: the run's config.
    workdir: the run's folder.
    results: its results.
    quantized: for a `ptq` run, the `(model, variables)` it measured
      (`haqjax.ptq.runner.run`); without them the PTQ flow is repeated
      (`ptq_model`).

  Returns:
    `results` with those keys.
  """
  workdir = os.path.abspath(workdir)
  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         manual_dir=config.manual_dir, val_size=config.val_size,
                         split_seed=config.split_seed)
  fake = results.get("test_top1_fake_quant", results["test_top1"])
  try:
    if config.mode == "ptq":
      policy = load_policy(os.path.join(workdir, "policy.json"))
      model, variables = quantized or ptq_model(config, splits, policy)
      exported = export_model(model, variables, policy, splits, workdir,
                              batch_size=config.eval_batch_size, fake_quant_top1=fake)
    else:
      exported = export_finished(workdir, workdir, splits,
                                 batch_size=config.eval_batch_size, fake_quant_top1=fake,
                                 reuse=False)
  except Exception as e:  # pylint: disable=broad-except
    exported = failure(e)
  results = {**results, **final_top1(results, exported)}
  haq_io.write_json(os.path.join(workdir, "results.json"), results)
  return results


def export_run(config: Config, workdir: str) -> dict[str, Any]:
  """`--mode=export`: the integer model of the run in `config.init_from`."""
  if not config.init_from:
    raise ValueError("init_from is empty; allowed: the workdir of a finished qat or "
                     "ptq run (mode=export exports it)")
  run_config, policy_path = read_run(config.init_from)
  splits = haq_data.load(run_config.dataset, data_dir=config.data_dir or run_config.data_dir,
                         manual_dir=config.manual_dir or run_config.manual_dir,
                         val_size=run_config.val_size, split_seed=run_config.split_seed)
  fake_quant = None
  results_path = os.path.join(config.init_from, "results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      done = json.load(f)
    fake_quant = done.get("test_top1_fake_quant", done.get("test_top1"))
  os.makedirs(workdir, exist_ok=True)
  if run_config.mode == "ptq":
    policy = load_policy(policy_path)
    model, variables = ptq_model(run_config, splits, policy)
    results = export_model(model, variables, policy, splits, workdir,
                           batch_size=config.eval_batch_size, fake_quant_top1=fake_quant)
  else:
    results = export_finished(config.init_from, workdir, splits,
                              batch_size=config.eval_batch_size,
                              fake_quant_top1=fake_quant, reuse=False)
  return {"mode": "export", "model": run_config.model, "dataset": run_config.dataset,
          "test_top1": final_top1({"test_top1": fake_quant}, results)["test_top1"],
          "test_top5": None, "val_top1": None, "steps": 0, **results}
