"""Search jobs end with their integer model; what is reported when there is none.

A small HAWQ job (the cheapest search: one sensitivity pass, no scored
episodes) exports its fine-tuned model and the uniform reference's, and
reports the integer models' test top-1. The fallbacks run in process on a
random digits model: a model the integer engine cannot express, and a
machine without the `onnx` package.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from haqjax import data as haq_data
from haqjax.jobs import export
from haqjax.nn import layer_table
from haqjax.nn.calibrate import calibrate
from haqjax.policy import Policy
from haqjax.report import run_report
from haqjax.train import trainer
from haqjax.train.config import Config
from launcher_testing import digits_fp32
from launcher_testing import launch_ok

# One test image of digits' 360, in points (see jobs_export_test.py).
ONE_IMAGE = 100 * 1 / 360 + 1e-9


@pytest.fixture(scope="module")
def search(tmp_path_factory):
  # From the FP32 model (and compilation cache) the launcher tests share.
  flags, tmp = digits_fp32(tmp_path_factory, "export_end")
  workdir = tmp / "hawq"
  launch_ok(*flags, f"--workdir={workdir}", "--mode=hawq", "--budget=0.85",
            "--finetune_epochs=0.25", "--hawq_probes=2", "--hawq_max_iterations=3",
            "--hawq_batches=1")
  return tmp, workdir


def _read(path):
  return json.loads(path.read_text())


def test_search_reports_its_integer_model(search):
  _, workdir = search
  results = _read(workdir / "results.json")
  exported = _read(workdir / "export" / "results.json")
  assert {"model.stablehlo", "encodings.json", "weights.bin"} <= set(exported["files"])
  assert exported["policy"] == results["policy"]
  assert results["test_top1_source"] == "integer" and results["export"] == "export"
  assert results["test_top1"] == exported["integer_test_top1"]
  fake = _read(workdir / "finetune" / "results.json")["test_top1"]
  assert results["test_top1_fake_quant"] == fake == exported["fake_quant_test_top1"]
  assert abs(results["test_top1"] - fake) <= ONE_IMAGE
  assert results["export_seconds"] > 0
  report = (workdir / "report.md").read_text()
  assert f"integer model (fake-quant {fake:.2f}%" in report
  assert "## Integer model" in report and "sum(bits x params) / 8" in report


def test_uniform_reference_is_compared_as_an_integer_model(search):
  _, workdir = search
  results = _read(workdir / "results.json")
  reference = results["uniform_reference"]
  exported = _read(workdir / "uniform_reference" / "export" / "results.json")
  assert reference["test_top1_source"] == "integer"
  assert reference["export"] == "uniform_reference/export"
  assert reference["test_top1"] == exported["integer_test_top1"]
  assert results["delta_test_top1_vs_uniform"] == pytest.approx(
      results["test_top1"] - reference["test_top1"])


def test_report_names_the_fallback(search, tmp_path):
  """A run without an integer model says why, beside the fake-quant figure."""
  _, workdir = search
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  results = _read(copy / "results.json")
  error = "deploy: layer 'conv1' has activation quantizer MinMaxActivation"
  results.update(test_top1=results["test_top1_fake_quant"], test_top1_source="fake_quant",
                 integer_error=error, export=None)
  (copy / "results.json").write_text(json.dumps(results))
  md, _ = run_report.write_report(copy)
  text = open(md).read()
  assert f"fake-quant (no integer model: {error})" in text
  assert f"No integer model: {error}." in text


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return haq_data.load("digits", data_dir=str(tmp_path_factory.mktemp("digits")),
                       val_size=200)


def _model(splits, act_quantizer):
  """A random digits model at W4A4, calibrated, and its policy."""
  config = Config(model="digits_cnn", dataset="digits", mode="qat", policy="w4a4",
                  act_quantizer=act_quantizer)
  model = trainer.build_model(config, splits.spec.num_classes)
  shape = (1, *splits.spec.image_shape)
  policy = Policy.uniform(layer_table(model, shape).names, 4, 4)
  images = np.asarray(next(iter(haq_data.batches(
      splits.train, batch_size=64, shuffle=False, drop_remainder=False)))["image"])
  variables = jax.jit(model.init)(jax.random.key(0), images[:1])
  return model, calibrate(model, variables, [images], policy), policy


def test_engine_error_falls_back_to_fake_quant(digits, tmp_path, capsys):
  # Per-batch activation ranges: no fixed scale to requantize to.
  model, variables, policy = _model(digits, "dynamic")
  results = export.export_model(model, variables, policy, digits, str(tmp_path),
                                batch_size=200, fake_quant_top1=50.0)
  assert results["integer_test_top1"] is None and results["files"] == {}
  assert results["integer_error"].startswith("deploy: layer ")
  assert _read(tmp_path / "export" / "results.json") == results
  top1 = export.final_top1({"test_top1": 50.0}, results)
  assert (top1["test_top1"], top1["test_top1_source"]) == (50.0, "fake_quant")
  assert top1["integer_error"] == results["integer_error"]
  assert "export: no integer model (deploy: layer " in capsys.readouterr().err


def test_without_onnx_the_rest_is_written(digits, tmp_path, capsys, monkeypatch):
  model, variables, policy = _model(digits, "static")
  monkeypatch.setattr(export, "has_package", lambda name: name not in ("onnx",))
  results = export.export_model(model, variables, policy, digits, str(tmp_path),
                                batch_size=200)
  assert set(results["files"]) == {"model.stablehlo", "encodings.json", "weights.bin"}
  assert "pip install 'haqjax[export]'" in results["skipped"]["model.onnx"]
  assert results["integer_test_top1"] is not None
  assert results["onnxruntime_test_top1"] is None
  assert not (tmp_path / "export" / "model.onnx").exists()
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("export:")]
  assert lines == ["export: model.onnx and its onnxruntime test top-1 skipped: the onnx "
                   "package is not installed; pip install 'haqjax[export]' adds them"]
