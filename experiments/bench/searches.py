r"""The search families side by side on the quickstart: uniform, RL, Gumbel, HAWQ, greedy.

  python -m experiments.bench searches [--init_from=FP32_WORKDIR] \
      [--quantizer=minmax|lsq] [--quick] [--out=bench_searches.json]

On the quickstart CNN (Fashion-MNIST; the FP32 run of `--init_from`, else
one trained by `experiments/flags/quickstart.flags`) under `bismo-edge`
latency budgets of uniform W4A4's and W3A3's, each family finds a policy:

  uniform  the budget's uniform policy itself;
  rl       HAQ's DDPG search (`quickstart_rl.flags`: 120 episodes of 20
           fine-tune steps each);
  gumbel   the differentiable search (`quickstart_sweep.flags`: 0.5 epoch);
  hawq     one sensitivity pass (Hutchinson traces, `HawqConfig`'s
           defaults) and HAWQ-V3's ILP;
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

It also draws the HAWQ Pareto front (the ILP at each of `FRONT_BUDGETS`,
ratios of W4A4's latency, from the one pass) beside a Gumbel sweep over the
same budgets (`haqjax.search.gumbel.sweep`, one vmapped search), every point
fine-tuned and tested the same way, on one plot (`pareto.png`, with the
uniform and per-budget points).

Targets (issue 17): HAWQ's search <= 1/20 of the RL search's time, and its
test top-1 within 0.3 points of the best family's at each budget.

Everything is written under `bench_searches/<quantizer>[_quick]/` in the
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

QUANTIZERS = {"minmax": ("minmax", "static"), "lsq": ("lsq", "lsq")}
BUDGETS = ("w4a4", "w3a3")
FAMILIES = ("uniform", "rl", "gumbel", "hawq", "greedy")
# Budgets of the two Pareto fronts, ratios of uniform W4A4's latency (W3A3's
# is 0.83, W5A5's 1.233, W6A6's 1.523).
FRONT_BUDGETS = (0.7, 0.83, 0.92, 1.0, 1.12, 1.233, 1.38, 1.523)
# The persistent compilation cache of `--quick` when --compilation_cache is unset.
QUICK_CACHE = "~/.cache/haqjax/jit"
TARGET_RL_FRACTION = 1 / 20
TARGET_POINTS = 0.3


@dataclasses.dataclass(frozen=True)
class Plan:
  """The sizes of a run (the recipes', or `QUICK`'s)."""
  fp32_epochs: float = 10.0
  rl_episodes: int | None = None
  rl_warmup: int | None = None
  rl_finetune_steps: int | None = None
  search_val_size: int | None = None
  gumbel_epochs: float | None = None
  gumbel_warmup_epochs: float | None = None
  hawq: tuple[tuple[str, Any], ...] = ()
  finetune_epochs: float | None = None
  front_budgets: tuple[float, ...] = FRONT_BUDGETS


FULL = Plan()
QUICK = Plan(fp32_epochs=1.0, rl_episodes=6, rl_warmup=3, rl_finetune_steps=4,
             search_val_size=1000, gumbel_epochs=0.05, gumbel_warmup_epochs=0.01,
             hawq=(("hawq_probes", 2), ("hawq_max_iterations", 2),
                   ("hawq_tolerance", 0.0), ("hawq_batches", 1)),
             finetune_epochs=0.05, front_budgets=(0.83, 1.0, 1.233))


def configs(quantizer: str, budget: str, plan: Plan, fp32_dir: str,
            data_dir: str | None):
  """`(Config, SearchConfig, GumbelConfig, HawqConfig)` of one budget's searches."""
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel.config import GumbelConfig  # pylint: disable=g-import-not-at-top
  from haqjax.search.hawq.config import HawqConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  weight, act = QUANTIZERS[quantizer]
  common = dict(data_dir=data_dir, progress=False, tensorboard=False, init_from=fp32_dir,
                weight_quantizer=weight, act_quantizer=act)
  config, search = recipes.read_configs("quickstart_rl", (Config, SearchConfig), **common)
  _, _, gumbel = recipes.read_configs("quickstart_sweep", (Config, SearchConfig,
                                                           GumbelConfig), **common)
  ddpg = search.ddpg.replace(**{k: v for k, v in (("warmup_episodes", plan.rl_warmup),)
                                if v is not None})
  changes = {"search_episodes": plan.rl_episodes, "search_val_size": plan.search_val_size,
             "search_finetune_steps": plan.rl_finetune_steps,
             "finetune_epochs": plan.finetune_epochs}
  search = search.replace(budget=1.0, budget_reference=budget, ddpg=ddpg,
                          finetune_uniform_reference=False,
                          **{k: v for k, v in changes.items() if v is not None})
  gumbel = gumbel.replace(**{k: v for k, v in (
      ("gumbel_epochs", plan.gumbel_epochs),
      ("gumbel_warmup_epochs", plan.gumbel_warmup_epochs)) if v is not None})
  return config, search, gumbel, HawqConfig(**dict(plan.hawq))


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
  t0 = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - t0


def search_rl(config, search, setup) -> Any:
  """HAQ's DDPG search (scorer built, then the episodes)."""
  from haqjax.jobs import rl as rl_job  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.search.rl import search as rl_search  # pylint: disable=g-import-not-at-top
  scorer = rl_job.make_scorer(config, search, setup.splits, setup.fp32_dir)
  problem = rl_job.build_problem(config, search, setup.table,
                                 stages.fp32_val_top1(config, search, setup))
  return rl_search.run(problem, scorer, os.path.join(setup.workdir, "rl_search"),
                       tensorboard=False).policy


def gumbel_start(config, search, gumbel, setup):
  """`(model, search, variables)`: the Gumbel search's start from the FP32 weights."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  model = trainer.build_model(stages.qat_config(config, search, policy="w8a8"),
                              setup.splits.spec.num_classes)
  gsearch = gumbel_job.build_search(config, gumbel, model, setup.table.names, setup.wall)
  n, top = len(setup.table), max(gumbel.bits())
  start = Policy.create(setup.table.names, *setup.wall.fixed.apply(np.full(n, top),
                                                                   np.full(n, top)))
  return gsearch, stages.start_variables(config, model, setup.splits, setup.fp32_dir, start)


def _gumbel_plan(config, gumbel, setup):
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  per_epoch = haq_data.num_batches(setup.splits.train, config.batch_size, drop_remainder=True)
  return per_epoch, gumbel_job.schedule(gumbel, per_epoch)["total"]


def search_gumbel(config, search, gumbel, setup) -> Any:
  """One differentiable search under the setup's budget."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  from haqjax.search import scoring  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import single  # pylint: disable=g-import-not-at-top
  gsearch, variables = gumbel_start(config, search, gumbel, setup)
  per_epoch, total = _gumbel_plan(config, gumbel, setup)
  hparams = gumbel_job.make_hparams(gumbel, setup.wall.limit, per_epoch)
  return single.run(
      gsearch, hparams, gsearch.init(jax.random.PRNGKey(config.seed), hparams, variables),
      train=setup.splits.train, val=scoring.subset(setup.splits.val, search.search_val_size),
      wall=setup.wall, directory=os.path.join(setup.workdir, "gumbel_search"),
      batch_size=config.batch_size, total_steps=total, seed=config.seed,
      eval_batch_size=config.eval_batch_size, tensorboard=False).policy


def sweep_gumbel(config, search, gumbel, setup, walls) -> list[Any]:
  """The Gumbel searches at every wall's budget as one vmapped sweep."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  from haqjax.search import scoring  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  gsearch, variables = gumbel_start(config, search, gumbel, setup)
  per_epoch, total = _gumbel_plan(config, gumbel, setup)
  hps = sweep_lib.stack([gumbel_job.make_hparams(gumbel, w.limit, per_epoch) for w in walls])
  keys = jax.numpy.stack([jax.random.PRNGKey(config.seed)] * len(walls))
  return sweep_lib.run(
      gsearch, hps, sweep_lib.init(gsearch, keys, hps, variables), train=setup.splits.train,
      val=scoring.subset(setup.splits.val, search.search_val_size), walls=walls,
      directory=os.path.join(setup.workdir, "gumbel_sweep"), batch_size=config.batch_size,
      total_steps=total, seed=config.seed, eval_batch_size=config.eval_batch_size,
      tensorboard=False).policies


def finetuned(config, search, setup, policy, root: str, meta: dict[str, Any]
              ) -> dict[str, Any]:
  """`policy` saved and fine-tuned (resumable); its figures under `setup`'s budget.

  Each policy has one folder, `root/policies/w<bits>_a<bits>/`, so a policy
  that two families (or a family and a front) found is fine-tuned once.
  """
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  directory = os.path.join(root, "policies", "_".join(
      f"{role}{'-'.join(str(int(b)) for b in bits)}"
      for role, bits in (("w", policy.w_bits), ("a", policy.a_bits))))
  fsetup = dataclasses.replace(setup, workdir=directory, timings={})
  os.makedirs(directory, exist_ok=True)
  path, cost = stages.save_search_policy(config, search, fsetup, policy, meta)
  done = stages.finetune(config, search, fsetup, path)
  return {"w_bits": [int(b) for b in policy.w_bits],
          "a_bits": [int(b) for b in policy.a_bits], "cost": cost["cost"],
          "cost_ratio": cost["ratio"], "fits": bool(setup.wall.fits(policy.w_bits,
                                                                    policy.a_bits)),
          "test_top1": done["test_top1"], "directory": directory}


def _cached(path: str, compute) -> dict[str, Any]:
  """The JSON object at `path`, else `compute()` written there."""
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  done = stages.read_json(path)
  if done is None:
    done = compute()
    haq_io.write_json(path, done)
  return done


def sensitivity_pass(config, search, hawq, setup, root: str) -> tuple[Any, float]:
  """The quantizer's one sensitivity pass (`root/sensitivity.json`), and its seconds.

  Measured once for every budget and the front (it does not depend on the
  budget), and read back afterwards with the seconds it took.
  """
  from haqjax.jobs import hawq as hawq_job  # pylint: disable=g-import-not-at-top
  shared = dataclasses.replace(setup, workdir=root)
  timing = _cached(os.path.join(root, "sensitivity_seconds.json"), lambda: {
      "seconds": _timed(hawq_job.sensitivity_stage, config, search, hawq, shared)[1]})
  return hawq_job.sensitivity_stage(config, search, hawq, shared), timing["seconds"]


def _bits(d: dict[str, Any]):
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  return Policy.create(d["names"], d["w_bits"], d["a_bits"])


def _record(policy, seconds: float, **extra: Any) -> dict[str, Any]:
  return {"names": list(policy.names), "w_bits": [int(b) for b in policy.w_bits],
          "a_bits": [int(b) for b in policy.a_bits], "seconds": seconds, **extra}


def run_budget(quantizer: str, budget: str, plan: Plan, fp32_dir: str,
               data_dir: str | None, root: str) -> dict[str, Any]:
  """One budget: every family's policy, its search time and its fine-tune."""
  from haqjax.jobs import hawq as hawq_job  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import uniform  # pylint: disable=g-import-not-at-top
  from haqjax.search.hawq import greedy  # pylint: disable=g-import-not-at-top
  from haqjax.search.hawq import ilp  # pylint: disable=g-import-not-at-top
  config, search, gumbel, hawq = configs(quantizer, budget, plan, fp32_dir, data_dir)
  workdir = os.path.join(root, budget)
  setup = stages.prepare(config, search, workdir)

  def searches():
    out = {"uniform": _record(uniform.policy_of(setup.wall, setup.table.names, budget), 0.0)}
    policy, seconds = _timed(search_rl, config, search, setup)
    out["rl"] = _record(policy, seconds)
    policy, seconds = _timed(search_gumbel, config, search, gumbel, setup)
    out["gumbel"] = _record(policy, seconds)
    sensitivity, pass_s = sensitivity_pass(config, search, hawq, setup, root)
    problem = hawq_job.build_problem(search, hawq, setup, sensitivity)
    for family, solve in (("hawq", ilp.solve), ("greedy", greedy.solve)):
      policy, seconds = _timed(solve, problem)
      out[family] = _record(policy, pass_s + seconds, sensitivity_seconds=pass_s,
                            allocation_seconds=seconds)
    return out

  found = _cached(os.path.join(workdir, "searches.json"), searches)
  rows = []
  for family in FAMILIES:
    policy = _bits(found[family])
    row = finetuned(config, search, setup, policy, root,
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
    points, ilp_s = _timed(ilp.pareto_front, problem, [w.limit for w in walls])
    swept, sweep_s = _timed(sweep_gumbel, config, search, gumbel, setup, walls)
    return {"hawq": [_record(p.policy, pass_s + p.seconds) for p in points],
            "gumbel": [_record(p, sweep_s) for p in swept],
            "hawq_seconds": pass_s + ilp_s, "sweep_seconds": sweep_s}

  found = _cached(os.path.join(workdir, "searches.json"), searches)
  points = []
  for family in ("hawq", "gumbel"):
    for ratio, wall, record in zip(plan.front_budgets, walls, found[family]):
      fsearch = search.replace(budget=ratio)
      row = finetuned(config, fsearch, dataclasses.replace(setup, wall=wall), _bits(record),
                      root, {"algorithm": family, "front": True})
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
  print(f"  fronts over {len(f['budgets'])} budgets (x W4A4): HAWQ (one pass + ILPs) "
        f"{f['hawq_seconds']:.1f} s, Gumbel sweep {f['sweep_seconds']:.1f} s; "
        f"plot {result['plot']}", flush=True)


def run(init_from: str | None = None, data_dir: str | None = None,
        quantizer: str = "minmax", quick: bool = False) -> dict[str, Any]:
  """Runs the comparison; prints the table and returns a JSON-able dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  if quantizer not in QUANTIZERS:
    raise ValueError(f"quantizer={quantizer!r}; allowed: {', '.join(QUANTIZERS)}")
  cli.quiet_libraries()
  plan = QUICK if quick else FULL
  if quick and not jax.config.jax_compilation_cache_dir:
    # A smoke run's times mean nothing; its fine-tunes share one compiled step.
    cli.enable_compilation_cache(QUICK_CACHE)
  root = os.path.abspath(os.path.join("bench_searches",
                                      f"{quantizer}{'_quick' if quick else ''}"))
  if not init_from:
    init_from = os.path.join(root, "fp32")
    stages.train_stage(recipes.load_recipe("quickstart", epochs=plan.fp32_epochs,
                                           progress=False, tensorboard=False,
                                           data_dir=data_dir), init_from)
  t0 = time.perf_counter()
  budgets = [run_budget(quantizer, b, plan, init_from, data_dir, root) for b in BUDGETS]
  fronts = run_fronts(quantizer, plan, init_from, data_dir, root)
  result = {"jax": jax.__version__, "backend": jax.default_backend(),
            "model": "quickstart_cnn", "dataset": "fashion_mnist", "target": "bismo-edge",
            "metric": "latency", "quantizer": quantizer,
            "quantizers": dict(zip(("weight", "activation"), QUANTIZERS[quantizer])),
            "quick": quick, "fp32": init_from, "workdir": root, "budgets": budgets,
            "fronts": fronts, "targets": targets(budgets),
            "plot": plot(os.path.join(root, "pareto.png"), budgets, fronts, quantizer),
            "seconds": round(time.perf_counter() - t0, 1)}
  _print(result)
  return result
