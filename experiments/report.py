r"""Compares finished search runs side by side.

  python -m experiments.report /tmp/haqjax/quickstart_rl /tmp/haqjax/quickstart_gumbel \
      --out=/tmp/haqjax/compare

Prints one markdown table (per run: mode, model, target, budget, cost, cost
ratio, FP32 / search / test top-1, the uniform policy the budget refers to
with its cost, test top-1 and the difference in points, search time,
episodes or steps) and the per-layer bits of every run side by side. Costs
read in readable units (73.4 µs, 12.0 KiB); compare.csv keeps the SI values.
With --out it also writes compare.md, compare.html (self-contained),
compare.csv and, when all runs share a target and a budget metric,
pareto.png (test top-1 against cost, the runs' uniform references joined).
A folder that is not a finished search run prints one line and exits with
status 2.
"""

from __future__ import annotations

import csv
import io
import os
import sys

from absl import flags

from experiments import cli
from haqjax import io as haq_io
from haqjax import units
from haqjax.bitwidths import FLOAT_BITS
from haqjax.report import plots
from haqjax.report import render
from haqjax.report import run_report

_OUT = flags.DEFINE_string("out", None, "Folder for compare.md, compare.html, "
                           "compare.csv and pareto.png (default: print only).")

COLUMNS = ("run", "mode", "model", "dataset", "target", "budget", "cost", "unit",
           "cost_ratio", "cost_to_budget", "fp32_test_top1", "search_val_top1",
           "test_top1", "uniform_reference", "uniform_cost", "uniform_test_top1",
           "delta_vs_uniform", "search_seconds", "episodes_or_steps")
# Columns of the printed table (the CSV has all of COLUMNS): the unit is in the cells.
SHOWN = tuple(c for c in COLUMNS if c != "unit")


def _names(runs: list[run_report.Run]) -> list[str]:
  """Short unique names: the folder's basename, or more of its path on a clash."""
  parts = [r.workdir.rstrip(os.sep).split(os.sep) for r in runs]
  depth = 1
  while True:
    names = [os.sep.join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
      return names
    depth += 1


def summary_rows(runs: list[run_report.Run]) -> list[dict]:
  """One dict of `COLUMNS` per run."""
  rows = []
  for name, run in zip(_names(runs), runs):
    r = run.results
    ref = r.get("uniform_reference") or {}
    rows.append({
        "run": name, "mode": r["mode"], "model": r["model"], "dataset": r["dataset"],
        "target": r["target"], "budget": r["budget"], "cost": r["cost"],
        "unit": r["unit"], "cost_ratio": r["cost_ratio"],
        "cost_to_budget": r["cost"] / r["limit"],
        "fp32_test_top1": r.get("fp32_test_top1"),
        "search_val_top1": r.get("search_val_top1"), "test_top1": r.get("test_top1"),
        "uniform_reference": ref.get("name"), "uniform_cost": ref.get("cost"),
        "uniform_test_top1": ref.get("test_top1"),
        "delta_vs_uniform": r.get("delta_test_top1_vs_uniform"),
        "search_seconds": r.get("search_seconds"),
        "episodes_or_steps": r.get("episodes", r.get("search_steps")),
    })
  return rows


def _fmt(key: str, value, unit: str, digits: int = 3) -> str:
  if value is None:
    return "n/a"
  if key.endswith("top1"):
    return f"{value:.2f}%"
  if key == "delta_vs_uniform":
    return f"{value:+.2f} points"
  if key in ("cost_ratio", "cost_to_budget"):
    return f"{value:.3f}"
  if key in ("cost", "uniform_cost"):
    return units.format_cost(value, unit, digits)
  if key == "search_seconds":
    return f"{value:.0f} s"
  return str(value)


def bits_rows(runs: list[run_report.Run]) -> tuple[list[str], list[list[str]]]:
  """Per-layer 'w/a' bits of every run, one row per layer name (forward order)."""
  names: list[str] = []
  for run in runs:
    names += [l["name"] for l in run.policy["layers"] if l["name"] not in names]
  by_run = [{l["name"]: l for l in run.policy["layers"]} for run in runs]
  rows = []
  for i, name in enumerate(names):
    cells = []
    for layers in by_run:
      l = layers.get(name)
      cells.append("" if l is None else
                   f"{l['w_bits']}/{'f' if l['a_bits'] == FLOAT_BITS else l['a_bits']}")
    rows.append([str(i), name, *cells])
  return ["#", "layer", *_names(runs)], rows


def pareto_points(runs: list[run_report.Run]) -> list[dict] | None:
  """Points of `plot_pareto` when the runs share a target and metric, else None."""
  keys = {(r.results["target"], r.search["budget_metric"], r.results["unit"]) for r in runs}
  if len(keys) != 1 or any(r.results.get("test_top1") is None for r in runs):
    return None
  # One group per run: the legend names the runs. Their uniform references
  # join as one "uniform" curve, each point once (named after its run when two
  # runs trained the same uniform policy to different accuracies).
  points = [{"label": name, "group": f"{name} ({r.results['mode']})",
             "cost": r.results["cost"], "top1": r.results["test_top1"]}
            for name, r in zip(_names(runs), runs)]
  refs = [(name, r.results["uniform_reference"]) for name, r in zip(_names(runs), runs)
          if r.results.get("uniform_reference")]
  figures: dict[str, set] = {}
  for _, ref in refs:
    figures.setdefault(ref["name"], set()).add((ref["cost"], ref["test_top1"]))
  seen = set()
  for name, ref in refs:
    key = (ref["name"], ref["cost"], ref["test_top1"])
    if key not in seen:
      seen.add(key)
      label = ref["name"] if len(figures[ref["name"]]) == 1 else f"{ref['name']} ({name})"
      points.append({"label": label, "group": "uniform", "cost": ref["cost"],
                     "top1": ref["test_top1"]})
  return points


def compare(workdirs: list[str], out: str | None) -> str:
  """The comparison as markdown; writes the files under `out` when given."""
  runs = [run_report.load_run(w) for w in workdirs]
  rows = summary_rows(runs)
  # A run's cost and its uniform reference's with the digits that tell them apart.
  table = [[_fmt(k, row[k], row["unit"],
                 units.digits_apart([row["cost"], row["uniform_cost"]], row["unit"]))
            for k in SHOWN] for row in rows]
  bits_head, bits = bits_rows(runs)
  points = pareto_points(runs)
  doc = [("h", 1, f"Comparison of {len(runs)} search runs"),
         ("table", SHOWN, table),
         ("p", "cost_ratio is cost / the budget's reference network; "
               "cost_to_budget is cost / the budget's limit; uniform_reference is "
               "that network when it is a uniform policy, fine-tuned with the run's "
               "recipe, and delta_vs_uniform the run's test top-1 minus its."),
         ("h", 2, "Per-layer bits (weights/activations, f: float)"),
         ("table", bits_head, bits)]
  if points is None:
    doc.append(("p", "No Pareto plot: the runs differ in target or budget metric."))
  elif out:
    r = runs[0]
    plots.plot_pareto(
        os.path.join(out, "pareto.png"), points, metric=r.search["budget_metric"],
        unit=r.results["unit"], title=f"Test top-1 vs {r.search['budget_metric']} "
        f"on {r.results['target']}")
    doc += [("h", 2, "Accuracy vs cost"), ("figure", "accuracy vs cost", "pareto.png")]
  markdown = render.to_markdown(doc)
  if out:
    with haq_io.atomic_open(os.path.join(out, "compare.md")) as f:
      f.write(markdown)
    with haq_io.atomic_open(os.path.join(out, "compare.html")) as f:
      f.write(render.to_html(doc, out))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with haq_io.atomic_open(os.path.join(out, "compare.csv")) as f:
      f.write(text.getvalue())
  return markdown


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise ValueError("no runs given; usage: python -m experiments.report WORKDIR "
                     "[WORKDIR...] [--out=DIR]")
  print(compare(argv[1:], _OUT.value), end="", file=sys.stdout, flush=True)


if __name__ == "__main__":
  cli.run(main)
