"""The run report (haqjax/report/run_report.py) and `python -m experiments.report`.

The runs are made here from the library's own pieces (configs, layer table,
budget wall, plots) without any training, so the tests are quick; the
launcher tests check that real searches write the same report.
"""

import ast
import base64
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from haqjax import hardware
from haqjax import io as haq_io
from haqjax import models
from haqjax import units
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.policy import save_policy
from haqjax.report import plots
from haqjax.report import run_report
from haqjax.report import versus_uniform
from haqjax.jobs import stages
from haqjax.search.config import SearchConfig
from haqjax.search.rl import DDPGConfig
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.train.config import Config
from launcher_testing import ROOT
from launcher_testing import assert_one_line_error
from launcher_testing import launch
from launcher_testing import launch_many

DPI = 60
COMMAND = "python -m experiments.imagenet --flagfile=experiments/flags/digits.flags --mode={mode}"
A4_PX = (794, 1123)  # A4 at 96 dpi: 210 x 297 mm.


def _table():
  return layer_table(models.create("digits_cnn", num_classes=10), (1, 8, 8, 1))


UNIFORM_TOP1, UNIFORM_VAL = 95.0, 94.5  # The uniform reference's fine-tune, made up.


def make_run(workdir, mode="rl", target="bismo-edge", budget=0.6, command=True,
             uniform=False, points=()):
  """A finished search run's files, as the runners write them.

  `uniform`: with the budget reference (W8A8) fine-tuned beside the policy;
  `points`: `--uniform_results` points.
  """
  table = _table()
  config = Config(mode=mode, dataset="digits", model="digits_cnn", epochs=3.0)
  search = SearchConfig(target=target, budget=budget, search_episodes=6,
                        ddpg=DDPGConfig(warmup_episodes=3))
  gumbel = GumbelConfig(gumbel_epochs=1.0) if mode == "gumbel" else None
  wall = stages.build_wall(config, search, table)
  w, a = wall.enforce(np.full(len(table), 8), np.full(len(table), 8))
  policy = Policy.create(table.names, w, a)
  cost = wall.describe(w, a)
  os.makedirs(workdir / "plots")
  config.save(workdir / "config.json")
  search.save(workdir / "search_config.json")
  if gumbel:
    gumbel.save(workdir / "gumbel_config.json")
  haq_io.write_json(workdir / "layers.json", table.rows())
  unit = hardware.base.UNITS[search.budget_metric]
  save_policy(workdir / "policy.json", policy, model="digits_cnn", target=target,
              cost=cost["cost"], cost_ratio=cost["ratio"])
  results = {
      "mode": mode, "model": "digits_cnn", "dataset": "digits", "target": target,
      "budget": str(search.budget_spec()), "limit": wall.limit, "unit": unit,
      "cost": cost["cost"], "cost_ratio": cost["ratio"], "fits": True,
      "layer_costs": [float(c) for c in wall.layer_costs(w, a)],
      "policy": policy.to_dict()["layers"], "fp32_test_top1": 97.5,
      "fp32_val_top1": 97.0, "test_top1": 96.25, "test_top5": 99.9, "val_top1": 96.0,
      "search_val_top1": 95.5, "fp32_seconds": 12.0, "search_seconds": 34.0,
      "finetune_seconds": 5.0, "total_seconds": 52.0}
  if mode == "rl":
    results.update(best_reward=-0.15, best_episode=4, episodes=6, episodes_per_minute=10.6)
  else:
    results.update(argmax_cost_ratio=cost["ratio"], expected_cost=cost["cost"],
                   enforced=False, search_steps=40, search_epochs=1, steps_per_second=3.0)
  ref_w, ref_a = np.full(len(table), 8), np.full(len(table), 8)
  reference = {
      "name": "w8a8", "cost": wall.cost(ref_w, ref_a),
      "cost_ratio": wall.describe(ref_w, ref_a)["ratio"], "fits": False,
      "layer_costs": [float(c) for c in wall.layer_costs(ref_w, ref_a)],
      "policy": Policy.create(table.names, ref_w, ref_a).to_dict()["layers"],
      "test_top1": UNIFORM_TOP1, "test_top5": 99.0, "val_top1": UNIFORM_VAL,
      "finetune_seconds": 4.0, "directory": "uniform_reference"} if uniform else None
  results.update(
      budget_reference="w8a8", uniform_reference=reference,
      delta_test_top1_vs_uniform=96.25 - UNIFORM_TOP1 if uniform else None,
      delta_cost_vs_uniform=cost["cost"] - reference["cost"] if uniform else None,
      uniform_points=[{"label": l, "group": "uniform", "cost": c, "top1": t, "source": "u.json"}
                      for l, c, t in points])
  if uniform:
    results["uniform_reference_seconds"] = 4.0
  if command:
    results["command"] = COMMAND.format(mode=mode)
  haq_io.write_json(workdir / "results.json", results)
  plots.plot_policy_bits(workdir / "plots" / "bits.png", table.rows(), policy, dpi=DPI,
                         reference={"label": "uniform W8A8", "w_bits": 8, "a_bits": 8})
  if uniform:
    plots.plot_versus_uniform(
        workdir / "plots" / "uniform.png", {"label": "HAQ", "cost": cost["cost"],
                                            "top1": 96.25},
        {"label": "w8a8", "cost": reference["cost"], "top1": UNIFORM_TOP1},
        [{"label": l, "cost": c, "top1": t} for l, c, t in points], dpi=DPI)
  episodes = [{"episode": e, "reward": -0.1 * (6 - e), "cost": cost["cost"] * (0.9 + 0.02 * e),
               "warmup": e < 3} for e in range(6)]
  plots.plot_search_progress(workdir / "plots" / "search.png", episodes,
                             budget={"metric": "latency", "unit": unit, "limit": wall.limit},
                             dpi=DPI)
  if gumbel:
    bits = list(gumbel.bits())
    rng = np.random.default_rng(0)
    history = [(s, rng.dirichlet(np.ones(len(bits)), size=len(table))) for s in (0, 20, 40)]
    plots.plot_bit_probabilities(workdir / "plots" / "w_probs.png", history,
                                 names=list(table.names), bits=bits, dpi=DPI)
  return workdir


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
  workdir = make_run(tmp_path_factory.mktemp("rl") / "run", uniform=True)
  run_report.write_report(workdir)
  return workdir


@pytest.fixture(scope="module")
def gumbel_run(tmp_path_factory):
  workdir = make_run(tmp_path_factory.mktemp("gumbel") / "run", mode="gumbel")
  run_report.write_report(workdir)
  return workdir


def _pngs(workdir):
  return sorted(p for p in os.listdir(workdir / "plots") if p.endswith(".png"))


# ------------------------------------------------------------------ report.md


def test_markdown_summary_costs_and_command(rl_run):
  text = (rl_run / "report.md").read_text()
  assert text.startswith("# HAQ search: digits_cnn on digits\n")
  assert f"Reproduce: `{COMMAND.format(mode='rl')}`" in text
  results = json.loads((rl_run / "results.json").read_text())
  m = re.search(r"\| budget \| latency <= 0\.6 x w8a8 = ([0-9.]+) (ns|\u00b5s|ms|s) \|", text)
  assert m, text[:1500]
  value = float(m.group(1)) * {"ns": 1e-9, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
  assert 1 <= float(m.group(1)) < 1000  # The prefix that reads 1..999.
  assert value == pytest.approx(results["limit"], rel=5e-3)  # Three significant digits.
  assert "| after fine-tune | test / val | 96.25% / 96.00% (top-5 99.90%)" in text
  assert f"{results['cost'] / results['limit']:.3f}" in text
  assert "| search | 34.0 |" in text and "best at episode 4" in text
  for caption, path in (("per-layer bits", "plots/bits.png"),
                        ("search progress", "plots/search.png")):
    assert f"![{caption}]({path})" in text


def test_markdown_policy_rows_and_per_layer_cost(rl_run):
  text = (rl_run / "report.md").read_text()
  run = run_report.load_run(rl_run)
  table = _table()
  costs = run_report.layer_costs(run)
  # The hardware model's per-layer costs, summing to the network cost the search saved.
  target = hardware.get_target("bismo-edge")
  w = [l["w_bits"] for l in run.policy["layers"]]
  a = [l["a_bits"] for l in run.policy["layers"]]
  want = hardware.layer_costs(target, hardware.from_layer_table(table), w, a)["latency_s"]
  np.testing.assert_allclose(costs, np.asarray(want), rtol=1e-6)
  np.testing.assert_allclose(costs.sum(), run.results["cost"], rtol=1e-6)
  # One prefix for the column (the total's, which reads as 1..999), 3 digits.
  m = re.search(r"\| # \| layer \| kind \| MACs \| params \| weight bits \| "
                r"activation bits \| latency \((ns|\u00b5s|ms|s)\) \| share \|", text)
  assert m, text
  scale = {"ns": 1e9, "\u00b5s": 1e6, "ms": 1e3, "s": 1.0}[m.group(1)]
  assert 1 <= costs.sum() * scale < 1000
  policy = _policy_table(text)
  for i, name in enumerate(table.names):
    prefix = (f"| {i} | {name} | {table.kinds[i]} | {int(table.macs[i]):,} | "
              f"{int(table.params[i]):,} | {w[i]} | {a[i]} | ")
    row = next(l for l in policy.splitlines() if l.startswith(prefix))
    cell, share = row[len(prefix):].strip(" |").split(" | ")
    assert float(cell) == pytest.approx(costs[i] * scale, rel=5e-3, abs=5e-4), row
    assert share == f"{costs[i] / costs.sum():.1%}"
  assert f"| total |  | {int(table.macs.sum()):,} |" in text


def _policy_table(text):
  return text.split("## Policy", 1)[1].split("## Config", 1)[0]


def test_run_without_layer_costs_has_no_cost_column(tmp_path):
  # Runs from before results.json held layer_costs still get a report.
  workdir = make_run(tmp_path / "old")
  results = json.loads((workdir / "results.json").read_text())
  del results["layer_costs"]
  haq_io.write_json(workdir / "results.json", results)
  assert run_report.layer_costs(run_report.load_run(workdir)) is None
  run_report.write_report(workdir)
  policy = _policy_table((workdir / "report.md").read_text())
  assert "Per-layer costs are not in results.json" in policy
  assert "| # | layer | kind | MACs | params | weight bits | activation bits |\n" in policy
  assert "latency (" not in policy and "share" not in policy and "total" not in policy
  names = [l["name"] for l in json.loads((workdir / "layers.json").read_text())]
  assert all(f"| {i} | {name} |" in policy for i, name in enumerate(names))
  assert "<th>weight bits</th><th>activation bits</th></tr>" in (
      workdir / "report.html").read_text()


@pytest.mark.parametrize("saved, message", [
    ([1.0, 2.0, 3.0, 4.0], "expected a list of 3 numbers"),
    ("1.0", "expected a list of 3 numbers"),
    ([1.0, None, 2.0], "expected a list of 3 numbers"),
    ([1.0, float("nan"), 2.0], "holds nan; expected finite numbers"),
])
def test_malformed_layer_costs_are_reported_not_raised(tmp_path, saved, message):
  workdir = make_run(tmp_path / "run")
  results = json.loads((workdir / "results.json").read_text())
  assert len(results["layer_costs"]) == 3  # digits_cnn's layers.
  haq_io.write_json(workdir / "results.json", {**results, "layer_costs": saved})
  with pytest.raises(ValueError, match=message):
    run_report.layer_costs(run_report.load_run(workdir))
  run_report.write_report(workdir)
  policy = _policy_table((workdir / "report.md").read_text())
  assert "Per-layer costs are unavailable: results.json layer_costs" in policy
  assert "latency (" not in policy


# ------------------------------------------------------- found policy vs uniform


def _section(text, heading):
  return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def test_found_policy_beside_its_uniform_reference(rl_run):
  text = (rl_run / "report.md").read_text()
  r = json.loads((rl_run / "results.json").read_text())
  ref = r["uniform_reference"]
  assert r["delta_test_top1_vs_uniform"] == pytest.approx(1.25)
  section = _section(text, "Found policy vs uniform w8a8")
  label, (found, uniform) = units.format_costs([r["cost"], ref["cost"]], "s")
  factor = {"ns": 1e9, "\u00b5s": 1e6, "ms": 1e3}[label]
  assert (ref["cost"] - r["cost"]) * factor > 0.1  # The policy is cheaper: a visible gap.
  found_bits = [(l["w_bits"], l["a_bits"]) for l in r["policy"]]
  w = " ".join(str(b[0]) for b in found_bits)
  a = " ".join("f" if b[1] == 32 else str(b[1]) for b in found_bits)
  assert (f"| policy | weight bits | activation bits | cost ({label}) | cost (x w8a8) | "
          "test top-1 | val top-1 |") in section
  assert (f"| HAQ (RL) | {w} | {a} | {found} | {r['cost_ratio']:.3f} | 96.25% | "
          "96.00% |") in section
  assert (f"| uniform w8a8 | 8 8 8 | 8 8 8 | {uniform} | 1.000 | 95.00% | 94.50% |"
          in section)
  delta = units.format_number((r["cost"] - ref["cost"]) * factor)
  assert delta.startswith("-")
  assert (f"| found - uniform |  |  | {delta} | {r['cost_ratio'] - 1:+.3f} | +1.25 points | "
          "+1.50 points |") in section
  ratio = r["cost"] / ref["cost"]
  assert (f"The found policy is better than uniform w8a8 on the test split (+1.25 points) "
          f"at {ratio:.3f}x its cost ({units.format_cost(r['cost'], 's')} against "
          f"{units.format_cost(ref['cost'], 's')}, "
          f"{units.format_delta(r['cost'] - ref['cost'], 's')})") in section
  assert (f"| uniform w8a8: test top-1 | 95.00% at {units.format_cost(ref['cost'], 's')}; "
          f"the found policy +1.25 points at {ratio:.3f}x its cost |") in text
  assert "| time: FP32 / search / fine-tune / uniform reference | 12 s / 34 s / 5 s / 4 s |" \
      in text
  assert "| uniform reference | 4.0 |" in _section(text, "Timings")
  assert "![test top-1 vs cost: found policy and uniform](plots/uniform.png)" in text
  # The figure comes right after the bits plot.
  assert text.index("plots/bits.png") < text.index("plots/uniform.png") < text.index(
      "plots/search.png")


def test_uniform_results_points_and_a_worse_policy(tmp_path):
  workdir = make_run(tmp_path / "run", uniform=True,
                     points=[("w2a2", 3.0e-6, 90.0), ("w4a4", 5.5e-6, 97.5)])
  results = json.loads((workdir / "results.json").read_text())
  haq_io.write_json(workdir / "results.json",
                    {**results, "test_top1": 94.5, "delta_test_top1_vs_uniform": -0.5})
  run_report.write_report(workdir)
  section = _section((workdir / "report.md").read_text(), "Found policy vs uniform w8a8")
  assert "The found policy is worse than uniform w8a8 on the test split (-0.50 points)" \
      in section
  assert "| uniform (--uniform_results) | cost (\u00b5s) | test top-1 | found - it |" in section
  assert "| w2a2 | 3.00 | 90.00% | +4.50 points |" in section
  assert "| w4a4 | 5.50 | 97.50% | -3.00 points |" in section


def test_skipped_reference_is_named_and_fp32_budgets_have_no_section(tmp_path):
  workdir = make_run(tmp_path / "skipped")
  run_report.write_report(workdir)
  section = _section((workdir / "report.md").read_text(), "Found policy vs uniform w8a8")
  assert "Uniform w8a8, the budget's reference, was not fine-tuned " \
         "(--nofinetune_uniform_reference)" in section
  assert "| found - uniform |" not in section
  # A run from before these keys, or a budget of fp32, has no such section.
  results = json.loads((workdir / "results.json").read_text())
  for key in ("uniform_reference", "delta_test_top1_vs_uniform", "uniform_points"):
    del results[key]
  haq_io.write_json(workdir / "results.json", results)
  run_report.write_report(workdir)
  assert "vs uniform" not in (workdir / "report.md").read_text()


def test_summary_lines_read_in_readable_units():
  results = {"mode": "rl", "unit": "s", "budget_reference": "w4a4", "cost": 7.07e-05,
             "cost_ratio": 0.962, "test_top1": 91.1,
             "uniform_reference": {"name": "w4a4", "cost": 7.35e-05, "cost_ratio": 1.0,
                                   "test_top1": 90.97},
             "delta_test_top1_vs_uniform": 91.1 - 90.97}
  assert versus_uniform.summary_lines(results) == [
      "HAQ (RL): 70.7 \u00b5s (0.962 x w4a4), test top-1 91.10%",
      "uniform w4a4: 73.5 \u00b5s (1.000 x w4a4), test top-1 90.97%; "
      "found - uniform: +0.13 points"]
  close = {**results, "cost": 7.336e-05, "cost_ratio": 0.999,
           "uniform_reference": {**results["uniform_reference"], "cost": 7.344e-05}}
  assert [l.split(",")[0] for l in versus_uniform.summary_lines(close)] == [
      "HAQ (RL): 73.36 \u00b5s (0.999 x w4a4)", "uniform w4a4: 73.44 \u00b5s (1.000 x w4a4)"]
  energy = {"mode": "gumbel", "unit": "J", "budget_reference": "w8a8", "cost": 0.0123,
            "cost_ratio": 0.5, "test_top1": 70.0, "uniform_reference": None}
  assert versus_uniform.summary_lines(energy) == [
      "Gumbel search: 12.3 mJ (0.500 x w8a8), test top-1 70.00%"]


def test_report_reads_saved_data_only():
  # The report is built from a run's files: it imports no search job or stage
  # (only the config dataclasses, for their defaults).
  allowed = ("haqjax.io", "haqjax.bitwidths", "haqjax.units", "haqjax.configs",
             "haqjax.report",
             "haqjax.nn.table", "haqjax.search.config", "haqjax.search.gumbel.config",
             "haqjax.train.config")
  folder = os.path.join(ROOT, "haqjax", "report")
  for dirpath, _, files in os.walk(folder):
    for name in (f for f in files if f.endswith(".py")):
      with open(os.path.join(dirpath, name)) as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
          modules = [node.module] if node.module != "haqjax" else [
              f"haqjax.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
          modules = [a.name for a in node.names]
        else:
          continue
        for m in (m for m in modules if m.split(".")[0] in ("haqjax", "experiments")):
          assert any(m == a or m.startswith(a + ".") for a in allowed), (name, m)


def test_config_diff_lists_only_changed_fields(rl_run):
  text = (rl_run / "report.md").read_text()
  diff = text.split("## Config", 1)[1].split("<details>", 1)[0]
  assert "| config | mode | rl | train |" in diff
  assert "| config | epochs | 3.0 |" in diff and "| search | budget | 0.6 | 0.5 |" in diff
  assert "| search | search_episodes | 6 | 600 |" in diff
  assert "batch_size" not in diff and "| target |" not in diff  # Defaults.
  full = text.split("```json\n", 1)[1].split("\n```", 1)[0]
  saved = json.loads(full)
  assert saved["config"] == json.loads((rl_run / "config.json").read_text())
  assert saved["search"] == json.loads((rl_run / "search_config.json").read_text())


def test_gumbel_report_rows_and_probability_plots(gumbel_run):
  text = (gumbel_run / "report.md").read_text()
  assert text.startswith("# Gumbel bit search: digits_cnn on digits\n")
  assert "--mode=gumbel" in text
  assert "| search | gumbel relaxation, 40 steps (1 epochs), lagrange penalty, 3.00 steps/s |" in text
  assert "![weight bit probabilities](plots/w_probs.png)" in text
  assert "plots/a_probs.png" not in text  # Only plots that exist.
  assert "| gumbel | gumbel_epochs | 1.0 | 2.0 |" in text
  assert '"gumbel": {' in text


def test_rebuilt_command_parses_to_the_saved_configs(tmp_path):
  workdir = make_run(tmp_path / "old", command=False)
  run_report.write_report(workdir)
  text = (workdir / "report.md").read_text()
  m = re.search(r"^Reproduce \(rebuilt from the saved configs\): `(.+)`$", text, flags=re.M)
  assert m, text[:500]
  command = m.group(1)
  assert command.startswith("python -m experiments.imagenet --mode=rl ")
  assert command.endswith(f"--workdir={workdir}")
  parse = ("import json, sys\nfrom absl import flags\nfrom experiments import job_flags\n"
           "flags.FLAGS(['prog', *sys.argv[1:]])\n"
           "print(json.dumps({'config': job_flags.config_from_flags().to_dict(), "
           "'search': job_flags.search_from_flags().to_dict()}))")
  proc = subprocess.run([sys.executable, "-c", parse, *command.split()[3:]], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  parsed = json.loads(proc.stdout)
  saved = json.loads((workdir / "config.json").read_text())
  assert {k: v for k, v in parsed["config"].items() if k != "progress"} == {
      k: v for k, v in saved.items() if k != "progress"}
  assert parsed["search"] == json.loads((workdir / "search_config.json").read_text())
  # A second report keeps the command the first one printed.
  run_report.write_report(workdir)
  assert f": `{command}`" in (workdir / "report.md").read_text()


def test_runner_writes_results_with_command_then_both_reports(tmp_path):
  workdir = make_run(tmp_path / "run", command=False)
  results = json.loads((workdir / "results.json").read_text())
  stages.write_report(str(workdir), results, "python -m experiments.imagenet --mode=rl --x=1")
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == {**results, "command": "python -m experiments.imagenet --mode=rl --x=1"}
  assert "Reproduce: `python -m experiments.imagenet --mode=rl --x=1`" in (
      workdir / "report.md").read_text()
  assert (workdir / "report.html").stat().st_size > 10_000
  assert not [f for f in os.listdir(workdir) if f.endswith(".tmp")]


@pytest.mark.parametrize("remove, message", [
    ("results.json", "has no results.json"),
    ("layers.json", "has no layers.json"),
])
def test_load_run_rejects_unfinished_runs(tmp_path, remove, message):
  workdir = make_run(tmp_path / "run")
  os.remove(workdir / remove)
  with pytest.raises(ValueError, match=message):
    run_report.write_report(workdir)
  assert not (workdir / "report.md").exists()


def test_load_run_rejects_non_search_runs(tmp_path):
  workdir = make_run(tmp_path / "run")
  results = json.loads((workdir / "results.json").read_text())
  haq_io.write_json(workdir / "results.json", {**results, "mode": "qat"})
  with pytest.raises(ValueError, match="mode='qat'"):
    run_report.load_run(workdir)
  with pytest.raises(ValueError, match="is not a folder"):
    run_report.load_run(tmp_path / "nowhere")


# ---------------------------------------------------------------- report.html


def test_html_is_self_contained(gumbel_run):
  page = (gumbel_run / "report.html").read_text()
  assert page.startswith("<!DOCTYPE html>") and "<style>" in page
  assert not re.search(r"(?:https?:)?//[\w.-]+\.\w", page)  # No external resource.
  sources = re.findall(r'src="([^"]*)"', page)
  assert re.findall(r"<link|@import|url\(", page) == []
  names = _pngs(gumbel_run)
  assert len(sources) == len(names) == 3
  for src, name in zip(sources, ["bits.png", "search.png", "w_probs.png"]):
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == (gumbel_run / "plots" / name).read_bytes()
  assert "<details><summary>full config" in page
  assert "--mode=gumbel" in page and "<td>gumbel_epochs</td>" in page


def render_html(path, scale=96 / 72):
  """HTML -> PDF (WeasyPrint, offline) -> one PIL image per page (PDFium)."""
  weasyprint = pytest.importorskip("weasyprint")
  import pypdfium2  # pylint: disable=g-import-not-at-top
  pdf = weasyprint.HTML(filename=str(path)).write_pdf()
  doc = pypdfium2.PdfDocument(pdf)
  pages = [doc[i] for i in range(len(doc))]
  images = [p.render(scale=scale).to_pil() for p in pages]
  texts = [p.get_textpage().get_text_range() for p in pages]
  drawn = sum(1 for p in pages for o in p.get_objects()
              if o.type == pypdfium2.raw.FPDF_PAGEOBJ_IMAGE)
  return images, "\n".join(texts), drawn


@pytest.mark.parametrize("mode", ["rl", "gumbel"])
def test_html_renders_as_a_person_sees_it(rl_run, gumbel_run, tmp_path, mode):
  workdir = rl_run if mode == "rl" else gumbel_run
  images, text, drawn = render_html(workdir / "report.html")
  assert 2 <= len(images) <= 12
  assert drawn == len(_pngs(workdir))  # Every plot is drawn on a page.
  for i, image in enumerate(images):
    path = tmp_path / f"page{i}.png"
    image.save(path)
    with Image.open(path) as png:
      assert png.format == "PNG" and png.size == A4_PX, png.size
      gray = np.asarray(png.convert("L"))
    ink = (gray < 200).mean()
    assert 0.005 < ink < 0.6, (i, ink)
  flat = " ".join(text.split())
  heading = "HAQ search" if mode == "rl" else "Gumbel bit search"
  assert f"{heading}: digits_cnn on digits" in flat
  assert "Accuracy and cost" in flat and "96.25%" in flat
  assert "experiments.imagenet" in flat and f"--mode={mode}" in flat.replace(" ", "")


def test_every_plot_is_a_png_of_its_figure_size(gumbel_run):
  run = run_report.load_run(gumbel_run)
  table = _table()
  figs = {"bits.png": plots.policy_bits_figure(table.rows(), run.policy, dpi=DPI)}
  for name in _pngs(gumbel_run):
    with Image.open(gumbel_run / "plots" / name) as im:
      assert im.format == "PNG"
      rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
      size = im.size
    assert size[0] >= 200 and size[1] >= 150, (name, size)
    if name in figs:
      assert np.allclose(size, np.round(figs[name].get_size_inches() * DPI), atol=1), name
    assert len(np.unique(rgb, axis=0)) > 20, name
    assert 0.02 < np.any(rgb < 250, axis=1).mean() < 0.95, name


# ---------------------------------------------------------- experiments.report


def test_compare_two_runs_writes_tables_csv_and_pareto(rl_run, gumbel_run, tmp_path):
  out = tmp_path / "cmp"
  proc = launch(str(rl_run.parent), str(gumbel_run.parent), f"--out={out}",
                module="experiments.report", timeout=180)
  # Folders without results.json fail: the runs are the `run` subfolders.
  assert_one_line_error(proc, "is not a finished search run", "has no config.json")
  proc = launch(str(rl_run), str(gumbel_run), f"--out={out}",
                module="experiments.report", timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = [f"{p.parent.name}/run" for p in (rl_run, gumbel_run)]
  with open(out / "compare.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == names and [r["mode"] for r in rows] == ["rl", "gumbel"]
  for row, workdir in zip(rows, (rl_run, gumbel_run)):
    results = json.loads((workdir / "results.json").read_text())
    assert float(row["cost"]) == pytest.approx(results["cost"])
    assert float(row["cost_ratio"]) == pytest.approx(results["cost_ratio"])
    assert float(row["cost_to_budget"]) == pytest.approx(results["cost"] / results["limit"])
    assert float(row["test_top1"]) == results["test_top1"]
  assert [r["episodes_or_steps"] for r in rows] == ["6", "40"]
  # The rl run has its uniform reference; the gumbel one none.
  ref = json.loads((rl_run / "results.json").read_text())["uniform_reference"]
  assert (rows[0]["uniform_reference"], float(rows[0]["uniform_cost"]),
          float(rows[0]["uniform_test_top1"]), float(rows[0]["delta_vs_uniform"])) == (
              "w8a8", pytest.approx(ref["cost"]), 95.0, pytest.approx(1.25))
  assert [rows[1][k] for k in ("uniform_reference", "uniform_test_top1",
                               "delta_vs_uniform")] == ["", "", ""]
  markdown = (out / "compare.md").read_text()
  assert proc.stdout == markdown
  assert "| uniform_reference | uniform_cost | uniform_test_top1 | delta_vs_uniform |" \
      in markdown
  for workdir, tail in ((rl_run, f"| 96.25% | w8a8 | {units.format_cost(ref['cost'], 's')} "
                                 "| 95.00% | +1.25 points |"),
                        (gumbel_run, "| 96.25% | n/a | n/a | n/a | n/a |")):
    cost = json.loads((workdir / "results.json").read_text())["cost"]
    line = next(l for l in markdown.splitlines() if l.startswith(f"| {workdir.parent.name}/"))
    assert f"| {units.format_cost(cost, 's')} |" in line and tail in line, line
    assert "| s |" not in line  # The unit is in the cost cells.
  policy = json.loads((rl_run / "policy.json").read_text())["layers"]
  first = f"| 0 | {policy[0]['name']} | {policy[0]['w_bits']}/{policy[0]['a_bits']} |"
  assert first in markdown
  assert "![accuracy vs cost](pareto.png)" in markdown
  html = (out / "compare.html").read_text()
  assert html.count('src="data:image/png;base64,') == 1 and "http" not in html
  images, text, drawn = render_html(out / "compare.html")
  assert drawn == 1 and all(im.size == A4_PX for im in images)
  assert "Comparison of 2 search runs" in " ".join(text.split())
  with Image.open(out / "pareto.png") as im:
    fig = plots.pareto_figure([{"cost": 1.0, "top1": 1.0, "group": "g"}])
    assert im.size == tuple(np.round(fig.get_size_inches() * 120).astype(int))


def test_compare_runs_on_different_targets_has_no_pareto(rl_run, tmp_path):
  other = make_run(tmp_path / "bitfusion", target="bitfusion", budget=1.0)
  out = tmp_path / "cmp"
  proc = launch(str(rl_run), str(other), f"--out={out}", module="experiments.report",
                timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "No Pareto plot: the runs differ in target" in proc.stdout
  assert sorted(os.listdir(out)) == ["compare.csv", "compare.html", "compare.md"]


_BAD_INPUT = [
    ((), ("no runs given", "WORKDIR")),
    (("/nonexistent/run",), ("/nonexistent/run is not a folder",)),
]


@pytest.fixture(scope="module")
def bad_runs():
  """Each `_BAD_INPUT` launch, in one `launch_many`: args -> process."""
  procs = launch_many([args for args, _ in _BAD_INPUT], module="experiments.report",
                      timeout=120)
  return {args: proc for (args, _), proc in zip(_BAD_INPUT, procs)}


@pytest.mark.parametrize("args, fragments", _BAD_INPUT)
def test_compare_bad_input_is_one_line(bad_runs, args, fragments):
  assert_one_line_error(bad_runs[args], *fragments)
