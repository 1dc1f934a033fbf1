"""`--mode=export`: a finished QAT run's integer model, scored and written out."""

import json

import pytest

from launcher_testing import digits_fp32
from launcher_testing import launch
from launcher_testing import launch_ok


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  flags, tmp = digits_fp32(tmp_path_factory, "export")
  launch_ok(*flags, "--mode=qat", "--policy=w4a4", "--epochs=1", f"--workdir={tmp / 'qat'}")
  base = [f for f in flags if not f.startswith("--init_from")]
  proc = launch_ok(*base, "--mode=export", f"--init_from={tmp / 'qat'}",
                   f"--workdir={tmp / 'exp'}")
  return tmp, json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_writes_the_deployment_files(exported):
  tmp, _ = exported
  folder = tmp / "exp" / "export"
  names = {p.name for p in folder.iterdir()}
  assert {"model.stablehlo", "encodings.json", "weights.bin", "results.json"} <= names
  results = json.loads((folder / "results.json").read_text())
  # The packed kernels take their bits (and scales) and nothing more.
  assert results["packed_over_ideal"] == pytest.approx(1.0, abs=0.01)
  assert results["files"]["weights.bin"] >= results["packed_weight_bytes"]


def test_integer_model_scores_as_the_fake_quant_model(exported):
  """The integer model's test top-1 is the fake-quant run's within one image.

  Both use the same calibrated ranges; they differ only where a
  requantization rounds a value to the neighbouring code. The agreement
  asked of the integer model (>= 99.9% identical predictions) allows under
  one of the 360 test predictions to change; one image is 0.28 points.
  """
  tmp, summary = exported
  results = json.loads((tmp / "exp" / "export" / "results.json").read_text())
  fake = json.loads((tmp / "qat" / "results.json").read_text())["test_top1"]
  assert results["fake_quant_test_top1"] == fake
  assert summary["test_top1"] == results["integer_test_top1"]
  assert abs(results["integer_test_top1"] - fake) <= 100 * 1 / 360 + 1e-9


def test_onnxruntime_scores_as_the_integer_model(exported):
  """onnxruntime's top-1 on model.onnx is the integer engine's within one image.

  The QDQ model rounds each requantization once where the engine's gemmlowp
  arithmetic rounds twice; that moves under 1e-3 of the codes by one step
  (tests/deploy_export_test.py), under one of 360 predictions.
  """
  pytest.importorskip("onnxruntime")
  tmp, _ = exported
  results = json.loads((tmp / "exp" / "export" / "results.json").read_text())
  assert "model.onnx" in results["files"]
  assert abs(results["onnxruntime_test_top1"] - results["integer_test_top1"]) <= (
      100 * 1 / 360 + 1e-9)


def test_export_needs_a_finished_run(tmp_path):
  proc = launch("--flagfile=experiments/flags/digits.flags", "--mode=export",
                f"--init_from={tmp_path}", f"--workdir={tmp_path / 'out'}",
                f"--data_dir={tmp_path / 'data'}")
  assert proc.returncode != 0
  assert "has no config.json" in proc.stderr and "Traceback" not in proc.stderr
