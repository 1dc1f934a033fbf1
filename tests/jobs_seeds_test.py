"""`--seeds=K` as a user runs it: a search's fine-tunes over K seeds.

The HAWQ job (the cheapest search), from the FP32 digits model the launcher
tests share, fine-tunes its policy and the uniform W4A4 reference over two
seeds and exports member 0. A K-seed qat run and its export:
tests/train_members_test.py.
"""

import json
import os

import numpy as np
import pytest

from launcher_testing import assert_one_line_error
from launcher_testing import digits_fp32
from launcher_testing import launch
from launcher_testing import launch_ok


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return digits_fp32(tmp_path_factory, "seeds")


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _check_summary(results, seeds):
  tops = results["test_top1_members"]
  assert results["seeds"] == seeds and len(tops) == len(seeds)
  assert results["test_top1"] == pytest.approx(np.mean(tops))
  assert results["test_top1_std"] == pytest.approx(np.std(tops, ddof=1))
  vals = results["val_top1_members"]
  assert results["val_top1"] == pytest.approx(np.mean(vals))
  assert results["val_top1_std"] == pytest.approx(np.std(vals, ddof=1))


def test_search_fine_tunes_and_uniform_reference_over_seeds(shared):
  flags, tmp = shared
  workdir = tmp / "hawq"
  launch_ok(*flags, f"--workdir={workdir}", "--mode=hawq", "--budget=1.0",
            "--budget_reference=w4a4", "--finetune_epochs=0.25", "--hawq_probes=2",
            "--hawq_max_iterations=3", "--hawq_batches=1", "--seeds=2")
  results = _results(workdir)
  _check_summary(results, [0, 1])
  _check_summary(results["uniform_reference"], [0, 1])
  assert results["delta_test_top1_vs_uniform"] == pytest.approx(
      results["test_top1"] - results["uniform_reference"]["test_top1"])
  # Member 0 exported; test_top1 stays the members' (fake-quant) mean.
  assert results["export_member"] == 0 and results["export_seed"] == 0
  assert results["export"] == "export"
  assert os.path.exists(os.path.join(workdir, "export", "results.json"))
  assert results["test_top1_source"] == "fake_quant"
  assert results["export_test_top1"] is not None
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  assert "± " in report and "(2 seeds: " in report


def test_bad_seeds_fail_with_one_line(tmp_path):
  workdir = tmp_path / "bad"
  proc = launch("--flagfile=experiments/flags/digits.flags", f"--data_dir={tmp_path}",
                f"--workdir={workdir}", "--mode=qat", "--policy=w4a4", "--seeds=0")
  assert_one_line_error(proc, "--seeds is 0; allowed: a positive integer")
  assert not workdir.exists()
