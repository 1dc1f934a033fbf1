"""The export stage: qat and ptq jobs end with their integer model (unless
--noexport), and `--mode=export` writes a finished run's."""

import json

import pytest

from launcher_testing import digits_fp32
from launcher_testing import launch
from launcher_testing import launch_ok


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  flags, tmp = digits_fp32(tmp_path_factory, "export")
  qat = launch_ok(*flags, "--mode=qat", "--policy=w4a4", "--epochs=1",
                  f"--workdir={tmp / 'qat'}")
  base = [f for f in flags if not f.startswith("--init_from")]
  proc = launch_ok(*base, "--mode=export", f"--init_from={tmp / 'qat'}",
                   f"--workdir={tmp / 'exp'}")
  return tmp, json.loads(proc.stdout.strip().splitlines()[-1]), flags, qat


# The deployment files every export writes (model.onnx with the `export` extra).
FILES = {"model.stablehlo", "encodings.json", "weights.bin", "results.json"}
# One test image of digits' 360, in points: the integer model may differ from
# the fake-quant one by under one prediction (>= 99.9% identical).
ONE_IMAGE = 100 * 1 / 360 + 1e-9


def test_export_writes_the_deployment_files(exported):
  tmp = exported[0]
  folder = tmp / "exp" / "export"
  names = {p.name for p in folder.iterdir()}
  assert FILES <= names
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
  tmp, summary = exported[:2]
  results = json.loads((tmp / "exp" / "export" / "results.json").read_text())
  fake = json.loads((tmp / "qat" / "results.json").read_text())["test_top1_fake_quant"]
  assert results["fake_quant_test_top1"] == fake
  assert summary["test_top1"] == results["integer_test_top1"]
  assert abs(results["integer_test_top1"] - fake) <= ONE_IMAGE


def test_onnxruntime_scores_as_the_integer_model(exported):
  """onnxruntime's top-1 on model.onnx is the integer engine's within one image.

  The QDQ model rounds each requantization once where the engine's gemmlowp
  arithmetic rounds twice; that moves under 1e-3 of the codes by one step
  (tests/deploy_export_test.py), under one of 360 predictions.
  """
  pytest.importorskip("onnxruntime")
  tmp = exported[0]
  results = json.loads((tmp / "exp" / "export" / "results.json").read_text())
  assert "model.onnx" in results["files"]
  assert abs(results["onnxruntime_test_top1"] - results["integer_test_top1"]) <= ONE_IMAGE


def test_export_needs_a_finished_run(tmp_path):
  proc = launch("--flagfile=experiments/flags/digits.flags", "--mode=export",
                f"--init_from={tmp_path}", f"--workdir={tmp_path / 'out'}",
                f"--data_dir={tmp_path / 'data'}")
  assert proc.returncode != 0
  assert "has no config.json" in proc.stderr and "Traceback" not in proc.stderr


def _job_results(workdir):
  """The job's results.json and its export/results.json."""
  return (json.loads((workdir / "results.json").read_text()),
          json.loads((workdir / "export" / "results.json").read_text()))


def test_qat_job_ends_with_its_integer_model(exported):
  """The qat job's own results.json reports its integer model's test top-1."""
  tmp, _, _, qat = exported
  results, export = _job_results(tmp / "qat")
  assert FILES <= {p.name for p in (tmp / "qat" / "export").iterdir()}
  assert results["test_top1_source"] == "integer" and results["export"] == "export"
  assert results["test_top1"] == export["integer_test_top1"]
  assert results["test_top1_onnxruntime"] == export["onnxruntime_test_top1"]
  assert results["integer_error"] is None
  # The fake-quant figure is the trainer's, beside it, within one image.
  assert export["fake_quant_test_top1"] == results["test_top1_fake_quant"]
  assert abs(results["test_top1"] - results["test_top1_fake_quant"]) <= ONE_IMAGE
  summary = json.loads(qat.stdout.strip().splitlines()[-1])
  assert summary["test_top1"] == results["test_top1"]
  # Both runs of the same checkpoint build the same integer model.
  again = json.loads((tmp / "exp" / "export" / "results.json").read_text())
  assert again["integer_test_top1"] == export["integer_test_top1"]


def test_ptq_job_ends_with_its_integer_model(exported):
  """The ptq job exports the model it measured (its integer top-1 within one image)."""
  tmp, _, flags, _ = exported
  launch_ok(*flags, "--mode=ptq", "--policy=w8a8", "--noptq_adaround",
            "--calibration_size=64", f"--workdir={tmp / 'ptq'}")
  results, export = _job_results(tmp / "ptq")
  assert FILES <= {p.name for p in (tmp / "ptq" / "export").iterdir()}
  assert results["test_top1_source"] == "integer"
  assert results["test_top1"] == export["integer_test_top1"]
  assert abs(results["test_top1"] - results["test_top1_fake_quant"]) <= ONE_IMAGE


def test_noexport_writes_no_export(exported):
  tmp, _, flags, _ = exported
  workdir = tmp / "qat_noexport"
  launch_ok(*flags, "--mode=qat", "--policy=w4a4", "--epochs=0.1", "--export=false",
            f"--workdir={workdir}")
  assert (workdir / "results.json").exists() and not (workdir / "export").exists()
  results = json.loads((workdir / "results.json").read_text())
  assert "test_top1_source" not in results  # The trainer's (fake-quant) figures.
