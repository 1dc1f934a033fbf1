r"""The search families side by side on the quickstart: uniform, RL, Gumbel, HAWQ, greedy.

  python -m experiments.bench searches [--init_from=FP32_WORKDIR] \
      [--quantizer=minmax|lsq] [--hawq_curvature=gauss_newton|hessian] \
      [--nofronts] [--quick] [--out=bench_searches.json]

On the quickstart CNN (Fashion-MNIST; the FP32 run of `--init_from`, else
one trained by `experiments/flags/quickstart.flags`) under `bismo-edge`
latency budgets of uniform W4A4's and W3A3's, each family finds a policy:

  uniform  the budget's uniform policy itself;
  rl       HAQ's DDPG search (`quickstart_rl.flags`: 120 episodes of 20
           fine-tune steps each);
  gumbel   the differentiable search (`quickstart_sweep.flags`: 0.5 epoch);
  hawq     one sensitivity pass (`HawqConfig`'s defaults: Gauss-Newton
           traces; `--hawq_curvature=hessian`: Hutchinson's on the
           Hessian, HAWQ-V2/V3's) and HAWQ-V3's ILP;
  greedy   the same pass and the greedy allocation.

Every policy then gets the same fine-tune (the recipes' final one: 2 epochs
of QAT from the FP32 weights) and is tested. A row holds the bits, the
latency, test top-1 and the search's wall time from the FP32 weights to the
policy (RL: scorer and episodes; Gumbel: calibration and steps; HAWQ and
greedy: the pass and the allocation; compilation included unless
`--compilation_cache` is set). `--quantizer` picks the quantizers of every
family, the uniform points included: `minmax` (min-max weights, static
calibrated activation ranges: the recipes' defaults) or `lsq` (LSQ weights
and activations, learned steps).

It also draws the HAWQ Pareto front (the ILP at each of `families.FRONT_BUDGETS`,
ratios of W4A4's latency, from the one pass) beside a Gumbel sweep over the
same budgets (`haqjax.search.gumbel.sweep`, one vmapped search), every point
fine-tuned and tested the same way, on one plot (`pareto.png`, with the
uniform and per-budget points). `--nofronts` leaves the fronts out (the
families alone, at both budgets).

The families' runners and sizes are `experiments.families`', which
`python -m experiments.compare` shares (every family over K seeds, against
uniform at the same cost, on several targets, metrics and budgets).

Targets (issue 17): HAWQ's search <= 1/20 of the RL search's time, and its
test top-1 within 0.3 points of the best family's at each budget.

Everything is written under `bench_searches/<quantizer>[_hessian][_quick]/` in the
current folder: `policies/`, one folder per distinct policy (policy.json,
finetune/), and a folder per budget and for the fronts with the searches'
outputs and `searches.json` (policies and timings), so a rerun resumes
where the last one stopped. `--quick` runs every stage at toy size (a
smoke run: 1 FP32 epoch, 6 RL episodes, short fine-tunes, three front
budgets, the launcher's compilation cache unless --compilation_cache names
one); its accuracies and times say nothing about the families.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from experiments.families import FAMILIES
from experiments.families import FULL
from experiments.families import Plan
from experiments.families import QUANTIZERS
from experiments.families import QUICK
from experiments.families import QUICK_CACHE
from experiments.families import cached
from experiments.families import configs
from experiments.families import find
from experiments.families import policy_key
from experiments.families import policy_of
from experiments.families import record
from experiments.families import sensitivity_pass
from experiments.families import sweep_gumbel
from experiments.families import timed

# `HawqConfig.hawq_curvature`'s default (a test checks they agree); runs of
# the other curvature are written beside, suffixed with its name.
HAWQ_CURVATURE = "gauss_newton"

BUDGETS = ("w4a4", "w3a3")
TARGET_RL_FRACTION = 1 / 20
TARGET_POINTS = 0.3


def finetuned(config, search, setup, policy, root: str, meta: dict[str, Any]
              ) -> dict[str, Any]:
  """`policy` saved and fine-tuned (resumable); its figures under `setup`'s budget.

  Each policy has one folder, `root/policies/w<bits>_a<bits>/`, so a policy
  that two families (or a family and a front) found is fine-tuned once.
  """
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  directory = os.path.join(root, "policies", policy_key(policy))
  fsetup = dataclasses.replace(setup, workdir=directory, timings={})
  os.makedirs(directory, exist_ok=True)
  path, cost = stages.save_search_policy(config, search, fsetup, policy, meta)
  done = stages.finetune(config, search, fsetup, path)
  return {"w_bits": [int(b) for b in policy.w_bits],
          "a_bits": [int(b) for b in policy.a_bits], "cost": cost["cost"],
          "cost_ratio": cost["ratio"], "fits": bool(setup.wall.fits(policy.w_bits,
                                                                    policy.a_bits)),
          "test_top1": done["test_top1"], "directory": directory}


def run_budget(quantizer: str, budget: str, plan: Plan, fp32_dir: str,
               data_dir: str | None, root: str) -> dict[str, Any]:
  """One budget: every family's policy, its search time and its fine-tune."""
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  config, search, gumbel, hawq = configs(quantizer, budget, plan, fp32_dir, data_dir)
  workdir = os.path.join(root, budget)
  setup = stages.prepare(config, search, workdir)
  found = cached(os.path.join(workdir, "searches.json"), lambda: {
      family: find(family, config, search, gumbel, hawq, setup, root)
      for family in FAMILIES})
  rows = []
  for family in FAMILIES:
    row = finetuned(config, search, setup, policy_of(found[family]), root,
                    {"algorithm": family, "search_seconds": found[family]["seconds"]})
    rows.append({"budget": budget, "family": family,
                 "search_seconds": found[family]["seconds"], **row})
  return {"budget": budget, "limit": setup.wall.limit, "rows": rows}


def run_fronts(quantizer: str, plan: Plan, fp32_dir: str, data_dir: str | None,
               root: str) -> dict[str, Any]:
  """The HAWQ front (one pass, the ILP per budget) and the Gumbel sweep's, fine-tuned."""
  from haqjax.jobs import hawq as hawq_job  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.search.hawq import ilp  # pylint: disable=g-import-not-at-top
  config, search, gumbel, hawq = configs(quantizer, "w4a4", plan, fp32_dir, data_dir)
  workdir = os.path.join(root, "fronts")
  setup = stages.prepare(config, search, workdir)
  walls = [stages.build_wall(config, search.replace(budget=b), setup.table)
           for b in plan.front_budgets]

  def searches():
    sensitivity, pass_s = sensitivity_pass(config, search, hawq, setup, root)
    problem = hawq_job.build_problem(search, hawq, setup, sensitivity)
    points, ilp_s = timed(ilp.pareto_front, problem, [w.limit for w in walls])
    swept, sweep_s = timed(sweep_gumbel, config, search, gumbel, setup, walls)
    return {"hawq": [record(p.policy, pass_s + p.seconds) for p in points],
            "gumbel": [record(p, sweep_s) for p in swept],
            "hawq_seconds": pass_s + ilp_s, "sweep_seconds": sweep_s}

  found = cached(os.path.join(workdir, "searches.json"), searches)
  points = []
  for family in ("hawq", "gumbel"):
    for ratio, wall, found_one in zip(plan.front_budgets, walls, found[family]):
      fsearch = search.replace(budget=ratio)
      row = finetuned(config, fsearch, dataclasses.replace(setup, wall=wall),
                      policy_of(found_one), root, {"algorithm": family, "front": True})
      points.append({"family": family, "budget_ratio": ratio, **row})
  return {"budgets": list(plan.front_budgets), "points": points,
          "hawq_seconds": found["hawq_seconds"], "sweep_seconds": found["sweep_seconds"]}


def plot(path: str, budgets: list[dict[str, Any]], fronts: dict[str, Any],
         quantizer: str) -> str:
  """One plot: both fronts, the uniform points and each budget's family points."""
  from haqjax import report  # pylint: disable=g-import-not-at-top
  points = [{"label": r["budget"].upper() if r["family"] == "uniform" else r["family"],
             "group": r["family"], "cost": r["cost"], "top1": r["test_top1"]}
            for b in budgets for r in b["rows"]]
  points += [{"label": f"{p['budget_ratio']:g}", "cost": p["cost"], "top1": p["test_top1"],
              "group": "HAWQ front" if p["family"] == "hawq" else "Gumbel sweep"}
             for p in fronts["points"]]
  return report.plot_pareto(path, points, metric="latency", unit="s",
                            title=f"Quickstart, bismo-edge latency, {quantizer} quantizers")


def targets(budgets: list[dict[str, Any]]) -> dict[str, Any]:
  """Issue 17's targets per budget: HAWQ's time and accuracy against the others."""
  out = {}
  for b in budgets:
    by = {r["family"]: r for r in b["rows"]}
    best = max(r["test_top1"] for r in b["rows"] if r["family"] != "uniform")
    fraction = by["hawq"]["search_seconds"] / by["rl"]["search_seconds"]
    gap = best - by["hawq"]["test_top1"]
    out[b["budget"]] = {
        "hawq_fraction_of_rl": round(fraction, 4),
        "time_met": bool(fraction <= TARGET_RL_FRACTION),
        "hawq_points_below_best": round(gap, 2), "accuracy_met": bool(gap <= TARGET_POINTS),
        "mixed_minus_uniform": {f: round(by[f]["test_top1"] - by["uniform"]["test_top1"], 2)
                                for f in FAMILIES[1:]}}
  return out


def _print(result: dict[str, Any]) -> None:
  from haqjax import units  # pylint: disable=g-import-not-at-top
  print(f"Quickstart, bismo-edge latency, {result['quantizer']} quantizers"
        f"{' (quick: toy sizes)' if result['quick'] else ''}; test top-1 after the "
        "same fine-tune:")
  print(f"  {'budget':<7}{'family':<9}{'weight bits':<22}{'activation bits':<22}"
        f"{'latency':>18}{'top-1':>8}{'search s':>10}{'x RL':>8}")
  for b in result["budgets"]:
    rl = next(r for r in b["rows"] if r["family"] == "rl")["search_seconds"]
    for r in b["rows"]:
      lat = f"{units.format_cost(r['cost'], 's')} ({r['cost_ratio']:.3f}x)"
      x_rl = f"{r['search_seconds'] / rl:.3f}" if r["family"] != "uniform" else ""
      print(f"  {b['budget']:<7}{r['family']:<9}{' '.join(map(str, r['w_bits'])):<22}"
            f"{' '.join(map(str, r['a_bits'])):<22}{lat:>18}{r['test_top1']:>8.2f}"
            f"{r['search_seconds']:>10.1f}{x_rl:>8}")
  for budget, t in result["targets"].items():
    print(f"  {budget}: HAWQ search {t['hawq_fraction_of_rl']:.3f} x RL's (target <= "
          f"{TARGET_RL_FRACTION:.3f}: {'met' if t['time_met'] else 'NOT met'}); "
          f"{t['hawq_points_below_best']:+.2f} points below the best family (target <= "
          f"{TARGET_POINTS}: {'met' if t['accuracy_met'] else 'NOT met'}); mixed - uniform: "
          + ", ".join(f"{f} {d:+.2f}" for f, d in t["mixed_minus_uniform"].items()))
  f = result["fronts"]
  if f is None:
    print(f"  plot {result['plot']}", flush=True)
    return
  print(f"  fronts over {len(f['budgets'])} budgets (x W4A4): HAWQ (one pass + ILPs) "
        f"{f['hawq_seconds']:.1f} s, Gumbel sweep {f['sweep_seconds']:.1f} s; "
        f"plot {result['plot']}", flush=True)


def run(init_from: str | None = None, data_dir: str | None = None,
        quantizer: str = "minmax", quick: bool = False, fronts: bool = True,
        curvature: str = HAWQ_CURVATURE) -> dict[str, Any]:
  """Runs the comparison; prints the table and returns a JSON-able dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  if quantizer not in QUANTIZERS:
    raise ValueError(f"quantizer={quantizer!r}; allowed: {', '.join(QUANTIZERS)}")
  cli.quiet_libraries()
  plan = QUICK if quick else FULL
  plan = dataclasses.replace(plan, hawq=(*plan.hawq, ("hawq_curvature", curvature)))
  if quick and not jax.config.jax_compilation_cache_dir:
    # A smoke run's times mean nothing; its fine-tunes share one compiled step.
    cli.enable_compilation_cache(QUICK_CACHE)
  suffix = ("" if curvature == HAWQ_CURVATURE else f"_{curvature}") + ("_quick" if quick else "")
  root = os.path.abspath(os.path.join("bench_searches", f"{quantizer}{suffix}"))
  if not init_from:
    init_from = os.path.join(root, "fp32")
    stages.train_stage(recipes.load_recipe("quickstart", epochs=plan.fp32_epochs,
                                           progress=False, tensorboard=False,
                                           data_dir=data_dir), init_from)
  t0 = time.perf_counter()
  budgets = [run_budget(quantizer, b, plan, init_from, data_dir, root) for b in BUDGETS]
  fronts = run_fronts(quantizer, plan, init_from, data_dir, root) if fronts else None
  result = {"jax": jax.__version__, "backend": jax.default_backend(),
            "model": "quickstart_cnn", "dataset": "fashion_mnist", "target": "bismo-edge",
            "metric": "latency", "quantizer": quantizer, "hawq_curvature": curvature,
            "quantizers": dict(zip(("weight", "activation"), QUANTIZERS[quantizer])),
            "quick": quick, "fp32": init_from, "workdir": root, "budgets": budgets,
            "fronts": fronts, "targets": targets(budgets),
            "plot": plot(os.path.join(root, "pareto.png"), budgets,
                         fronts or {"points": []}, quantizer),
            "seconds": round(time.perf_counter() - t0, 1)}
  _print(result)
  return result
