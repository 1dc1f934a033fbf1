"""The launcher's `gumbel` mode as a user runs it: bad input, a small real search."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.nn import layer_table
from haqjax.policy import load_policy
from launcher_testing import launch
from launcher_testing import launch_many
from launcher_testing import assert_one_line_error
from launcher_testing import PNG_SIGNATURE
from launcher_testing import shared_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("gumbel")


def _digits(tmp, workdir):
  return ["--flagfile=experiments/flags/digits.flags", f"--data_dir={tmp / 'data'}",
          f"--workdir={workdir}", f"--compilation_cache={tmp / 'jit'}", "--noprogress",
          "--mode=gumbel"]


_BAD_FLAGS = [
    ("--gumbel_relaxation=gauss", ("gumbel_relaxation='gauss'", "gumbel, hard, softmax")),
    ("--gumbel_bits=", ("gumbel_bits=''", "bit-widths in 1..8")),
    ("--gumbel_tau0=0", ("gumbel_tau0=0.0", "> 0")),
    ("--gumbel_tau_min=-1", ("gumbel_tau_min=-1.0", "> 0")),
    ("--gumbel_bits=2,4,8 --max_bits=6", ("gumbel_bits='2,4,8' has 8", "2..6")),
]


def _bad_workdir(tmp, flags):
  return tmp / f"bad{[f for f, _ in _BAD_FLAGS].index(flags)}"


@pytest.fixture(scope="module")
def bad_runs(tmp):
  """Each `_BAD_FLAGS` launch, in one `launch_many`: flags -> process."""
  cases = [[*_digits(tmp, _bad_workdir(tmp, flags)), *flags.split()] for flags, _ in _BAD_FLAGS]
  return {flags: proc for (flags, _), proc in zip(_BAD_FLAGS, launch_many(cases))}


@pytest.mark.parametrize("flags, fragments", _BAD_FLAGS)
def test_bad_flags_fail_with_one_line(tmp, bad_runs, flags, fragments):
  assert_one_line_error(bad_runs[flags], *fragments)
  assert not _bad_workdir(tmp, flags).exists()


@pytest.fixture(scope="module")
def run(tmp, tmp_path_factory):
  flags, fp32 = shared_digits(tmp_path_factory)
  workdir = tmp / "search"
  args = [*flags, f"--workdir={workdir}", "--mode=gumbel", f"--init_from={fp32}",
          "--budget=0.85", "--gumbel_epochs=2", "--gumbel_warmup_epochs=0.5",
          "--finetune_epochs=0.25", "--log_every_steps=5", "--first_layer_w8", "--noexport"]
  proc = launch(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc, args


def test_policy_within_budget(run):
  workdir, proc, _ = run
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["mode"] == "gumbel" and summary["steps"] > 0
  table = layer_table(models.create("digits_cnn", num_classes=10), (1, 8, 8, 1))
  policy = load_policy(workdir / "policy.json", table.names)
  d = json.loads((workdir / "policy.json").read_text())
  assert d["cost"] <= d["budget"]["limit"] * (1 + 1e-9) and d["cost_ratio"] <= 0.85 + 1e-9
  cost = hardware.policy_cost(hardware.get_target("bismo-edge"),
                              hardware.from_layer_table(table),
                              np.asarray(policy.w_bits), np.asarray(policy.a_bits))
  np.testing.assert_allclose(d["cost"], float(cost), rtol=1e-5)
  assert d["search"]["algorithm"] == "gumbel"
  assert (d["layers"][0]["w_bits"], d["layers"][0]["a_bits"]) == (8, 32)


def test_results_records_and_plots(run):
  workdir, _, _ = run
  r = json.loads((workdir / "results.json").read_text())
  assert (r["mode"], r["model"], r["fits"]) == ("gumbel", "digits_cnn", True)
  assert r["trace_counts"] == {"train": 1, "eval": 1}
  assert 0 <= r["test_top1"] <= 100 and r["search_epochs"] == 2
  epochs = [json.loads(l) for l in (workdir / "search" / "epochs.jsonl").read_text().splitlines()]
  assert [e["epoch"] for e in epochs] == [0, 1]
  steps = [json.loads(l) for l in (workdir / "search" / "steps.jsonl").read_text().splitlines()]
  assert steps and all(np.allclose(np.sum(s["w_probs"], -1), 1) for s in steps)
  for name in ("bits.png", "search.png", "w_probs.png", "a_probs.png"):
    assert (workdir / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE, name
  report = (workdir / "report.md").read_text()
  assert "--mode=gumbel" in report and "plots/w_probs.png" in report


def test_uniform_reference_has_the_fixed_first_layer(run):
  workdir, proc, _ = run
  r = json.loads((workdir / "results.json").read_text())
  ref = r["uniform_reference"]
  # --first_layer_w8 holds for the uniform W8A8 as for the search's policy:
  # the first layer's input stays in floating point.
  assert ref["name"] == "w8a8"
  assert [(l["w_bits"], l["a_bits"]) for l in ref["policy"]] == [(8, 32), (8, 8), (8, 8)]
  saved = json.loads((workdir / "uniform_reference" / "policy.json").read_text())
  assert saved["layers"] == ref["policy"] and saved["search"]["algorithm"] == "uniform"
  assert saved["cost"] == ref["cost"]
  table = layer_table(models.create("digits_cnn", num_classes=10), (1, 8, 8, 1))
  cost = hardware.policy_cost(hardware.get_target("bismo-edge"),
                              hardware.from_layer_table(table), np.array([8, 8, 8]),
                              np.array([32, 8, 8]))
  np.testing.assert_allclose(ref["cost"], float(cost), rtol=1e-5)
  assert r["delta_test_top1_vs_uniform"] == pytest.approx(r["test_top1"] - ref["test_top1"])
  report = (workdir / "report.md").read_text()
  assert "## Found policy vs uniform w8a8" in report
  assert "| uniform w8a8 | 8 8 8 | f 8 8 | " in report
  assert proc.stderr.strip().splitlines()[-1].startswith("uniform w8a8: ")


def _mtimes(folder):
  return {str(p.relative_to(folder)): p.stat().st_mtime_ns
          for p in folder.rglob("*") if p.is_file()}


def test_rerun_resumes_without_redoing(run):
  workdir, _, args = run
  before = (workdir / "search" / "epochs.jsonl").read_text()
  uniform = _mtimes(workdir / "uniform_reference")
  results = json.loads((workdir / "results.json").read_text())
  proc = launch(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "search" / "epochs.jsonl").read_text() == before
  assert _mtimes(workdir / "uniform_reference") == uniform  # Read back, not retrained.
  again = json.loads((workdir / "results.json").read_text())
  assert again["policy"] == results["policy"] and again["test_top1"] == results["test_top1"]
  assert again["uniform_reference"]["test_top1"] == results["uniform_reference"]["test_top1"]


_PARSE = """
import json, sys
from absl import flags
from experiments import job_flags
flags.FLAGS(["prog", "--flagfile=" + sys.argv[1], "--workdir=/nonexistent"])
config = job_flags.config_from_flags()
search = job_flags.search_from_flags()
gumbel = job_flags.gumbel_from_flags()
print(json.dumps({"mode": config.mode, "model": config.model, **search.to_dict(),
                  **gumbel.to_dict()}))
"""


def test_quickstart_recipe_matches_the_rl_one():
  out = {}
  for name in ("quickstart_gumbel", "quickstart_rl"):
    proc = subprocess.run([sys.executable, "-c", _PARSE, f"experiments/flags/{name}.flags"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
  g, r = out["quickstart_gumbel"], out["quickstart_rl"]
  assert g["mode"] == "gumbel" and g["gumbel_bits"] == "2,3,4,5,6,8"
  for key in ("model", "target", "budget_metric", "budget", "budget_kind",
              "budget_reference", "min_bits", "max_bits", "finetune_epochs",
              "finetune_learning_rate"):
    assert g[key] == r[key], key
