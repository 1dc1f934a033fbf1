"""A Gumbel search that diverges stops with one line, its last checkpoint kept."""

import os
import re

import pytest

from launcher_testing import assert_one_line_error
from launcher_testing import digits_fp32
from launcher_testing import launch


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return digits_fp32(tmp_path_factory, "gumbel_divergence")


def _search(flags, workdir, *more):
  return [*flags, f"--workdir={workdir}", "--mode=gumbel", "--budget=0.85",
          "--gumbel_warmup_epochs=0", "--log_every_steps=5", "--finetune_epochs=0.25",
          *more]


def test_an_exploding_learning_rate_stops_before_any_checkpoint(digits):
  flags, tmp = digits
  workdir = tmp / "exploding"
  proc = launch(*_search(flags, workdir, "--gumbel_epochs=1", "--gumbel_weight_lr=1e38"))
  # Step 1's loss is the FP32 weights' (finite); its update scales weights to
  # ~1e38, past float32's range in the next products, so a later step's loss
  # is not finite. The check runs at the first log point (step 5), before any
  # epoch end, so no checkpoint exists.
  assert_one_line_error(proc, "training diverged", "no checkpoint was written before it")
  step = int(re.search(r"at step (\d+)", proc.stderr).group(1))
  assert 2 <= step <= 5, proc.stderr
  checkpoints = workdir / "search" / "checkpoints"
  assert not checkpoints.exists() or not os.listdir(checkpoints)
  assert not (workdir / "policy.json").exists()
