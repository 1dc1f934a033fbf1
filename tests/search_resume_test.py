"""A HAQ search killed at any point resumes: nothing lost, the same best policy.

The launcher runs in real subprocesses on the digits dataset with a tiny
search. Run A goes uninterrupted; run B, the same command with another
workdir, is SIGKILLed (its whole process group) twice at random points and
rerun to completion. B must keep every episode it had finished when killed,
redo none of them, and end with A's episodes, best episode and policy.

The runs share the FP32 model, prepared data and persistent compilation cache
of the pytest run's launcher tests, and skip what follows the fine-tune of the
found policy (the uniform reference's fine-tune and the export), which the
kills never reach.
"""

import json
import random

import pytest

from launcher_testing import digits_fp32
from launcher_testing import jsonl_lines
from launcher_testing import kill_after
from launcher_testing import launch_ok
from launcher_testing import without_seconds

EPISODES = 16


@pytest.fixture(scope="module")
def base_args(tmp_path_factory):
  common, tmp = digits_fp32(tmp_path_factory, "resume")
  return [*common, "--mode=rl",
          f"--search_episodes={EPISODES}", "--warmup_episodes=4",
          "--search_finetune_steps=3", "--hidden=32,32", "--ddpg_batch_size=16",
          "--budget=0.5", "--finetune_epochs=0.25", "--nofinetune_uniform_reference",
          "--noexport"], tmp


@pytest.fixture(scope="module")
def run_a(base_args):
  args, tmp = base_args
  workdir = tmp / "a"
  launch_ok(*args, f"--workdir={workdir}")
  return workdir


def test_uninterrupted_run(run_a):
  records = jsonl_lines(run_a / "search" / "episodes.jsonl")
  assert [r["episode"] for r in records] == list(range(EPISODES))
  assert (run_a / "results.json").exists()


def test_killed_twice_at_random_points_resumes_to_the_same_policy(base_args, run_a):
  args, tmp = base_args
  workdir = tmp / "b"
  args = [*args, f"--workdir={workdir}"]
  episodes_path = workdir / "search" / "episodes.jsonl"
  seed = random.randrange(2**32)
  rng = random.Random(seed)
  why = f"(random seed {seed})"

  first = rng.randint(3, 6)
  seen = kill_after(args, episodes_path, first, rng.uniform(0.0, 0.3))
  assert len(seen) >= first, why
  assert not (workdir / "results.json").exists(), why
  second = len(seen) + rng.randint(2, 4)
  seen2 = kill_after(args, episodes_path, second, rng.uniform(0.0, 0.3))
  # Killed, rerun and killed again: every episode finished before the first kill
  # is still there, unchanged (same `seconds`: it was restored, not replayed).
  assert seen2[:len(seen)] == seen, why
  assert len(seen2) >= second and len(seen2) < EPISODES, why

  launch_ok(*args)
  records = jsonl_lines(episodes_path)
  assert [r["episode"] for r in records] == list(range(EPISODES)), why
  assert records[:len(seen2)] == seen2, why
  reference = jsonl_lines(run_a / "search" / "episodes.jsonl")
  assert without_seconds(records) == without_seconds(reference), why

  policy_a = json.loads((run_a / "policy.json").read_text())
  policy_b = json.loads((workdir / "policy.json").read_text())
  assert policy_b["layers"] == policy_a["layers"], why
  assert policy_b["search"] == policy_a["search"], why
  assert policy_b["cost"] == policy_a["cost"], why
  results_a = json.loads((run_a / "results.json").read_text())
  results_b = json.loads((workdir / "results.json").read_text())
  for key in ("best_episode", "best_reward", "search_val_top1", "episodes", "policy",
              "test_top1"):
    assert results_b[key] == results_a[key], (key, why)
