"""A ptq job exports the very model it measured, without repeating PTQ."""

import json

import pytest

from haqjax.jobs import export as export_lib
from haqjax.ptq import runner
from haqjax.train.config import Config
from launcher_testing import digits_fp32


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  flags, _ = digits_fp32(tmp_path_factory, "export_ptq")
  value = lambda name: next(f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}="))
  return Config(mode="ptq", dataset="digits", model="digits_cnn", val_size=200,
                data_dir=value("data_dir"), init_from=value("init_from"), policy="w8a8",
                ptq_adaround=False, calibration_size=64, batch_size=64,
                eval_batch_size=200)


def test_export_takes_the_ptq_result(config, tmp_path, monkeypatch):
  results, ptq_result = runner.run(config, str(tmp_path))
  assert results == json.loads((tmp_path / "results.json").read_text())

  def repeat(*args):
    raise AssertionError("the export stage repeated PTQ")

  monkeypatch.setattr(export_lib, "ptq_model", repeat)
  final = export_lib.finish_run(config, str(tmp_path), results,
                                (ptq_result.model, ptq_result.variables))
  assert final["test_top1_source"] == "integer", final.get("integer_error")
  assert final["test_top1_fake_quant"] == results["test_top1"]
  # One test image is 1/360 of the digits test split: the integer model may
  # round a borderline image the other way, no more.
  assert abs(final["test_top1"] - results["test_top1"]) <= 100 / 360 + 1e-9
  assert json.loads((tmp_path / "results.json").read_text()) == final
