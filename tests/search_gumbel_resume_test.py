"""A Gumbel search or sweep killed at any point resumes to the uninterrupted result.

Each case runs the real command in subprocesses on the digits dataset: run A
goes uninterrupted; run B, the same command with another workdir, is
SIGKILLed (its whole process group) at a random point after its first epoch
end, again after a later one, and rerun to completion. B must keep every
epoch record it had when killed, unchanged, and end with A's epoch records,
policies and test accuracies.

The runs share the FP32 model, prepared data and persistent compilation cache
of the pytest run's launcher tests; the single search skips what follows the
fine-tune of its policy (the uniform reference's fine-tune and the export),
which the kills never reach.
"""

import json
import random

import pytest

from launcher_testing import digits_fp32
from launcher_testing import jsonl_lines
from launcher_testing import kill_after
from launcher_testing import launch_ok
from launcher_testing import without_seconds

EPOCHS = 3

CASES = {
    # name: (module, extra flags, epochs.jsonl lines per epoch)
    "gumbel": ("experiments.imagenet", ["--budget=0.8", "--nofinetune_uniform_reference",
                                        "--noexport"], 1),
    "sweep": ("experiments.sweep", ["--sweep.budget=0.5,0.9"], 2),
}


@pytest.fixture(scope="module")
def common(tmp_path_factory):
  flags, tmp = digits_fp32(tmp_path_factory, "gumbel_resume")
  return [*flags, "--mode=gumbel",
          f"--gumbel_epochs={EPOCHS}", "--gumbel_warmup_epochs=0.5",
          "--finetune_epochs=0.25", "--log_every_steps=7"], tmp


def _outputs(module, workdir):
  """What a finished run leaves that must not depend on interruptions."""
  if module == "experiments.sweep":
    rows = [json.loads(l) for l in (workdir / "sweep.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("member", "w_bits", "a_bits", "cost", "test_top1")}
            for r in rows]
  results = json.loads((workdir / "results.json").read_text())
  policy = json.loads((workdir / "policy.json").read_text())
  return ({k: results[k] for k in ("policy", "search_val_top1", "test_top1")},
          policy["layers"], policy["cost"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_twice_resumes_to_the_uninterrupted_run(common, case):
  module, extra, per_epoch = CASES[case]
  args, tmp = common
  args = [*args, *extra]
  run_a = tmp / f"{case}_a"
  launch_ok(*args, f"--workdir={run_a}", module=module)
  reference = jsonl_lines(run_a / "search" / "epochs.jsonl")
  assert len(reference) == EPOCHS * per_epoch

  workdir = tmp / f"{case}_b"
  args = [*args, f"--workdir={workdir}"]
  epochs_path = workdir / "search" / "epochs.jsonl"
  seed = random.randrange(2**32)
  rng = random.Random(seed)
  why = f"(random seed {seed})"
  seen = kill_after(args, epochs_path, per_epoch, rng.uniform(0.0, 1.0), module=module)
  assert len(seen) >= per_epoch, why
  if len(seen) < EPOCHS * per_epoch:
    seen2 = kill_after(args, epochs_path, len(seen) + per_epoch, rng.uniform(0.0, 0.5),
                       module=module)
    # Every epoch record from before the first kill is still there, unchanged
    # (the same `seconds`: restored, not replayed).
    assert seen2[:len(seen)] == seen, why
    seen = seen2
  launch_ok(*args, module=module)
  records = jsonl_lines(epochs_path)
  assert records[:len(seen)] == seen, why
  assert without_seconds(records) == without_seconds(reference), why
  assert _outputs(module, workdir) == _outputs(module, run_a), why
