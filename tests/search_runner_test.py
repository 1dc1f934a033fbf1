"""The launcher's `rl` mode as a user runs it: bad input, and a small real search."""

import json
import os

import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.nn import layer_table
from haqjax.policy import load_policy
from haqjax.search import env
from launcher_testing import launch
from launcher_testing import launch_many
from launcher_testing import assert_one_line_error
from launcher_testing import PNG_SIGNATURE
from launcher_testing import shared_digits

EPISODES = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def digits_table():
  return layer_table(models.create("digits_cnn", num_classes=10), (1, 8, 8, 1))


def _digits(data_dir, workdir):
  return ["--flagfile=experiments/flags/digits.flags", f"--data_dir={data_dir}",
          f"--workdir={workdir}", "--compilation_cache=", "--noprogress", "--mode=rl"]


def _lowest_ratio(table) -> float:
  """digits_cnn's cheapest bismo-edge latency at 2 bits, as a multiple of W8A8."""
  wall = env.BudgetWall(
      hardware.get_target("bismo-edge"), hardware.from_layer_table(table),
      hardware.Budget(metric="latency", value=1.0, reference="w8a8"), min_bits=2,
      max_bits=8, fixed=env.Fixed.create(len(table), mode="linear"))
  return wall.min_cost / wall.reference


_BAD_FLAGS = [
    ("--min_bits=5 --max_bits=3", ("min_bits=5 is larger than max_bits=3",)),
    ("--target=tpu9", ("target='tpu9'", "bismo-edge")),
    ("--budget_reference=int8", ("budget_reference", "'int8'", "w8a8")),
    ("--search_scorer=foo", ("search_scorer='foo'", "qat, ptq")),
    ("--wall_order=cost", ("wall_order='cost'", "haq, saving")),
    ("--hidden=a,b", ("hidden='a,b'", "300,300")),
    ("--search_finetune_steps=1000", ("search_finetune_steps=1000", "the training split has")),
]


@pytest.fixture(scope="module")
def bad_input(data_dir, tmp_path_factory):
  """The module's bad-input launches, in one `launch_many`: `(name -> process, folder)`.

  Case `name` runs in `folder / name / "run"`. No --init_from: a check made
  after the FP32 stage would leave fp32/ behind.
  """
  root = tmp_path_factory.mktemp("bad_input")
  cases = {"budget": ["--budget=0.01"]}
  cases.update({f"flags{i}": flags.split() for i, (flags, _) in enumerate(_BAD_FLAGS)})
  (root / "uniform").mkdir()
  uniform = root / "uniform" / "uniform.json"
  uniform.write_text(json.dumps({"int4": 90.0}))
  cases["uniform"] = ["--search_finetune_steps=3", f"--uniform_results={uniform}"]
  procs = launch_many([*_digits(data_dir, root / name / "run"), *more]
                      for name, more in cases.items())
  return dict(zip(cases, procs)), root


def _assert_no_run(root, name):
  run = root / name / "run"
  assert not run.exists(), os.listdir(run)


def test_budget_below_minimum_names_the_lowest_ratio(bad_input, digits_table):
  procs, root = bad_input
  assert_one_line_error(procs["budget"], "0.01 x w8a8", "lowest cost reachable with bits >= 2",
                        f"= {_lowest_ratio(digits_table):.4g} x w8a8", "--min_bits")
  _assert_no_run(root, "budget")


@pytest.mark.parametrize("flags, fragments", _BAD_FLAGS)
def test_bad_search_flags_fail_before_training(bad_input, flags, fragments):
  procs, root = bad_input
  name = f"flags{[f for f, _ in _BAD_FLAGS].index(flags)}"
  assert_one_line_error(procs[name], *fragments)
  _assert_no_run(root, name)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """The shared digits flags and FP32 model, and this module's folder."""
  flags, fp32 = shared_digits(tmp_path_factory)
  return flags, fp32, tmp_path_factory.mktemp("runner")


def _search_args(digits, workdir, *more):
  flags, fp32, _ = digits
  return [*flags, f"--workdir={workdir}", "--mode=rl", f"--init_from={fp32}",
          f"--search_episodes={EPISODES}", "--warmup_episodes=3",
          "--search_finetune_steps=3", "--hidden=32,32", "--ddpg_batch_size=16",
          "--budget=0.5", "--finetune_epochs=0.25", "--noexport", *more]


@pytest.fixture(scope="module")
def search_run(digits):
  workdir = digits[2] / "search"
  proc = launch(*_search_args(digits, workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_search_summary_line(search_run):
  _, proc = search_run
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["mode"] == "rl" and summary["steps"] == EPISODES
  assert 0 <= summary["test_top1"] <= 100


def test_policy_json(search_run, digits_table):
  workdir, _ = search_run
  policy = load_policy(workdir / "policy.json", digits_table.names)
  d = json.loads((workdir / "policy.json").read_text())
  assert d["model"] == "digits_cnn" and d["target"] == "bismo-edge"
  budget = d["budget"]
  assert (budget["metric"], budget["value"], budget["kind"], budget["reference"],
          budget["unit"]) == ("latency", 0.5, "ratio", "w8a8", "s")
  assert d["cost"] <= budget["limit"] * (1 + 1e-9)
  assert d["cost_ratio"] <= 0.5 + 1e-9
  # The stored cost is the hardware model's cost of the stored bits.
  cost = hardware.policy_cost(hardware.get_target("bismo-edge"),
                              hardware.from_layer_table(digits_table),
                              np.asarray(policy.w_bits), np.asarray(policy.a_bits))
  np.testing.assert_allclose(d["cost"], float(cost), rtol=1e-5)
  search = d["search"]
  assert 0 <= search["episode"] < EPISODES
  assert 0 <= search["val_top1"] <= 100 and 0 <= search["fp32_val_top1"] <= 100
  np.testing.assert_allclose(search["reward"],
                             0.1 * (search["val_top1"] - search["fp32_val_top1"]))
  assert all(2 <= l["w_bits"] <= 8 and 2 <= l["a_bits"] <= 8 for l in d["layers"])


def test_results_json(search_run):
  workdir, _ = search_run
  r = json.loads((workdir / "results.json").read_text())
  policy = json.loads((workdir / "policy.json").read_text())
  assert (r["mode"], r["model"], r["dataset"], r["target"]) == (
      "rl", "digits_cnn", "digits", "bismo-edge")
  assert r["fits"] is True and r["cost"] <= r["limit"] * (1 + 1e-9)
  assert r["cost"] == policy["cost"] and r["policy"] == policy["layers"]
  assert r["episodes"] == EPISODES and r["episodes_per_minute"] > 0
  assert r["best_episode"] == policy["search"]["episode"]
  assert r["best_reward"] == policy["search"]["reward"]
  assert r["search_val_top1"] == policy["search"]["val_top1"]
  # The default static activation ranges: recorded and fitted (sign 'auto')
  # under jit, each traced once for the whole search.
  assert r["trace_counts"] == {"train": 1, "eval": 1, "calibration_record": 1,
                               "calibration_calibrate": 1}
  for key in ("test_top1", "test_top5", "val_top1", "fp32_test_top1", "fp32_val_top1"):
    assert 0 <= r[key] <= 100, key
  for key in ("fp32_seconds", "search_seconds", "finetune_seconds", "total_seconds"):
    assert r[key] >= 0, key
  assert (workdir / "finetune" / "results.json").exists()
  assert not (workdir / "fp32").exists()  # --init_from named the FP32 run.


def test_episode_records(search_run):
  workdir, _ = search_run
  lines = (workdir / "search" / "episodes.jsonl").read_text().splitlines()
  records = [json.loads(l) for l in lines]
  assert [r["episode"] for r in records] == list(range(EPISODES))
  assert [r["warmup"] for r in records] == [True] * 3 + [False] * (EPISODES - 3)
  for r in records:
    assert r["cost"] <= r["limit"] * (1 + 1e-9)
    assert r["seconds"] > 0 and 0 <= r["top1"] <= 100
  best = max(records, key=lambda r: r["reward"])
  assert records[-1]["best_reward"] == best["reward"]


def test_report_and_plots(search_run):
  workdir, _ = search_run
  report = (workdir / "report.md").read_text()
  assert "Reproduce: `python -m experiments.imagenet" in report
  assert f"--workdir={workdir}" in report and "--mode=rl" in report
  assert "plots/bits.png" in report and "plots/search.png" in report
  for name in ("bits.png", "search.png"):
    path = workdir / "plots" / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE, name
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path) as image:
      image.verify()
      assert image.size[0] > 100 and image.size[1] > 100


def _files_with_mtimes(folder):
  return {str(p.relative_to(folder)): p.stat().st_mtime_ns
          for p in sorted(folder.rglob("*")) if p.is_file()}


def test_uniform_reference_fine_tuned_with_the_same_recipe(search_run, digits, digits_table):
  workdir, proc = search_run
  r = json.loads((workdir / "results.json").read_text())
  ref = r["uniform_reference"]
  # --budget=0.5 of the default reference, uniform W8A8 (no fixed layers here).
  assert ref["name"] == "w8a8" and ref["directory"] == "uniform_reference"
  assert [(l["w_bits"], l["a_bits"]) for l in ref["policy"]] == [(8, 8)] * len(digits_table)
  cost = hardware.policy_cost(hardware.get_target("bismo-edge"),
                              hardware.from_layer_table(digits_table),
                              np.full(len(digits_table), 8), np.full(len(digits_table), 8))
  np.testing.assert_allclose(ref["cost"], float(cost), rtol=1e-5)
  np.testing.assert_allclose(sum(ref["layer_costs"]), ref["cost"], rtol=1e-9)
  assert ref["cost_ratio"] == pytest.approx(1.0, rel=1e-9) and ref["fits"] is False
  np.testing.assert_allclose(r["cost"] / ref["cost"], r["cost_ratio"], rtol=1e-9)
  done = json.loads((workdir / "uniform_reference" / "finetune" / "results.json").read_text())
  assert (ref["test_top1"], ref["val_top1"]) == (done["test_top1"], done["val_top1"])
  assert r["delta_test_top1_vs_uniform"] == pytest.approx(r["test_top1"] - ref["test_top1"])
  assert r["delta_cost_vs_uniform"] == pytest.approx(r["cost"] - ref["cost"])
  assert r["uniform_points"] == [] and r["uniform_reference_seconds"] > 0
  # The same recipe from the same FP32 weights: only the policy differs.
  found = json.loads((workdir / "finetune" / "config.json").read_text())
  uniform = json.loads((workdir / "uniform_reference" / "finetune" / "config.json").read_text())
  assert found["policy"] == str(workdir / "policy.json")
  assert uniform["policy"] == str(workdir / "uniform_reference" / "policy.json")
  assert {k: v for k, v in found.items() if k != "policy"} == {
      k: v for k, v in uniform.items() if k != "policy"}
  assert found["init_from"] == str(digits[1])
  report = (workdir / "report.md").read_text()
  assert "## Found policy vs uniform w8a8" in report
  assert "| uniform w8a8 | 8 8 8 | 8 8 8 | " in report
  assert "| found - uniform |  |  | -" in report  # Half the budget: cheaper.
  assert "plots/uniform.png" in report
  assert (workdir / "plots" / "uniform.png").read_bytes()[:8] == PNG_SIGNATURE
  # The last lines on stderr: both policies, costs in readable units.
  tail = proc.stderr.strip().splitlines()[-2:]
  assert tail[0].startswith("HAQ (RL): ") and " \u00b5s (" in tail[0], tail
  assert tail[1].startswith("uniform w8a8: ") and "found - uniform: " in tail[1], tail


def test_rerun_reuses_the_uniform_reference(search_run, digits):
  workdir, _ = search_run
  folder = workdir / "uniform_reference"
  before = _files_with_mtimes(folder)
  assert {"policy.json", "finetune/results.json"} <= set(before)
  assert len(before) > 4  # Checkpoints, metrics, configs too.
  results = json.loads((workdir / "results.json").read_text())
  # Reused as it is, even with the stage turned off.
  for more in ((), ("--nofinetune_uniform_reference",)):
    proc = launch(*_search_args(digits, workdir, *more))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fine-tune uniform" not in proc.stderr
    assert _files_with_mtimes(folder) == before
    again = json.loads((workdir / "results.json").read_text())
    assert again["uniform_reference"]["test_top1"] == results["uniform_reference"]["test_top1"]
    assert again["delta_test_top1_vs_uniform"] == results["delta_test_top1_vs_uniform"]


def test_uniform_reference_skipped_by_flag_and_uniform_results_points(digits, tmp_path):
  points = tmp_path / "uniform.json"
  points.write_text(json.dumps({"w2a2": 40.0, "w4a4": {"test_top1": 80.0, "cost": 1e-5}}))
  out = tmp_path / "skipped"
  # The search's length does not matter here: two (random) warm-up episodes.
  proc = launch(*_search_args(digits, out, "--search_episodes=2", "--warmup_episodes=2",
                              "--nofinetune_uniform_reference",
                              f"--uniform_results={points}"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (out / "uniform_reference").exists()
  r = json.loads((out / "results.json").read_text())
  assert r["uniform_reference"] is None and r["delta_test_top1_vs_uniform"] is None
  assert "uniform_reference_seconds" not in r
  assert [(p["label"], p["top1"]) for p in r["uniform_points"]] == [("w2a2", 40.0),
                                                                     ("w4a4", 80.0)]
  assert r["uniform_points"][1]["cost"] == 1e-5
  report = (out / "report.md").read_text()
  assert "## Found policy vs uniform w8a8" in report
  assert "Uniform w8a8, the budget's reference, was not fine-tuned" in report
  assert "| uniform (--uniform_results) |" in report and "| w2a2 |" in report
  assert (out / "plots" / "uniform.png").read_bytes()[:8] == PNG_SIGNATURE


def test_bad_uniform_results_fail_before_training(bad_input):
  procs, root = bad_input
  assert_one_line_error(procs["uniform"], "uniform policy 'int4'", "wXaY")
  _assert_no_run(root, "uniform")


def test_finetune_of_another_policy_is_refused(tmp_path, digits_table):
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  from haqjax.policy import save_policy  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  names = digits_table.names
  finetune = tmp_path / "finetune"
  finetune.mkdir()
  save_policy(finetune / "policy.json", Policy.uniform(names, 4, 4))
  same, other = tmp_path / "same.json", tmp_path / "other.json"
  save_policy(same, Policy.uniform(names, 4, 4), cost=1.0)
  save_policy(other, Policy.uniform(names, 3, 4))
  stages.check_finetuned_policy(str(finetune), str(same))
  with pytest.raises(ValueError, match="holds the fine-tune of another policy"):
    stages.check_finetuned_policy(str(finetune), str(other))
  stages.check_finetuned_policy(str(tmp_path / "none"), str(other))


def test_kmeans_search_under_a_size_budget(digits, tmp_path):
  out = tmp_path / "kmeans"
  proc = launch(*_search_args(digits, out, "--quantization=kmeans", "--budget_metric=size",
                              "--budget=0.15", "--budget_reference=fp32",
                              "--search_episodes=3", "--warmup_episodes=2",
                              "--search_finetune_steps=2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert results["fits"] and results["cost_ratio"] <= 0.15 + 1e-9
  # Weights only: activations stay in floating point.
  assert all(l["a_bits"] == 32 for l in results["policy"])
  assert all(2 <= l["w_bits"] <= 8 for l in results["policy"])
  finetune_config = json.loads((out / "finetune" / "config.json").read_text())
  assert finetune_config["weight_quantizer"] == "kmeans"
