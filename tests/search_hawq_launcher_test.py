"""The launcher's `hawq` flags and mode as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

from haqjax.train.config import MODES
from launcher_testing import assert_one_line_error
from launcher_testing import launch
from launcher_testing import shared_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PARSE = """
import json, sys
from absl import flags
from experiments import job_flags
flags.FLAGS(["prog", *sys.argv[1:], "--workdir=/nonexistent"])
print(json.dumps(job_flags.hawq_from_flags().to_dict()))
"""


def _parse(*args):
  return subprocess.run([sys.executable, "-c", _PARSE, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_hawq_flags_give_the_config():
  proc = _parse("--hawq_bits=4,8", "--hawq_probes=3", "--hawq_tolerance=0.01",
                "--hawq_max_iterations=7", "--hawq_batches=1", "--hawq_allocator=greedy",
                "--hawq_curvature=gauss_newton", "--hawq_granularity=tensor")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
      "hawq_bits": "4,8", "hawq_curvature": "gauss_newton", "hawq_granularity": "tensor",
      "hawq_probes": 3, "hawq_tolerance": 0.01,
      "hawq_max_iterations": 7, "hawq_batches": 1, "hawq_allocator": "greedy"}


needs_mode = pytest.mark.skipif("hawq" not in MODES,
                                reason="haqjax.train.config.MODES has no 'hawq' yet")


@needs_mode
def test_bad_hawq_flag_fails_with_one_line(tmp_path):
  workdir = tmp_path / "bad"
  proc = launch("--flagfile=experiments/flags/digits.flags", f"--data_dir={tmp_path}",
                f"--workdir={workdir}", "--mode=hawq", "--hawq_allocator=lp")
  assert_one_line_error(proc, "hawq_allocator='lp'", "ilp, greedy, monotone")
  assert not workdir.exists()


@needs_mode
def test_mode_hawq_runs_end_to_end(tmp_path, tmp_path_factory):
  # The job trains its own 1-epoch FP32 model (no --init_from), on the shared
  # prepared data and compilation cache.
  flags = shared_flags(tmp_path_factory)
  workdir = tmp_path / "job"
  proc = launch(*flags, f"--workdir={workdir}", "--mode=hawq", "--epochs=1",
                "--budget=0.85", "--finetune_epochs=0.25", "--nofinetune_uniform_reference",
                "--hawq_probes=2", "--hawq_max_iterations=3", "--hawq_batches=1",
                "--noexport")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["mode"] == "hawq" and 2 <= summary["steps"] <= 3
  policy = json.loads((workdir / "policy.json").read_text())
  assert policy["cost"] <= policy["budget"]["limit"] * (1 + 1e-9)
  assert (workdir / "sensitivity.json").exists()
