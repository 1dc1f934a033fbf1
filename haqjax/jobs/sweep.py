"""K differentiable bit searches as one vmapped job, their fine-tunes and a Pareto plot.

What `python -m experiments.sweep` runs:

  python -m experiments.sweep --flagfile=experiments/flags/quickstart_sweep.flags \
      --init_from=/tmp/haqjax/quickstart/fp32 --workdir=/tmp/haqjax/quickstart_sweep \
      --sweep.budget=0.5,0.6,0.7,0.8,0.9,1.0,1.2,1.4 [--sweep.lambda=0.1,1] \
      [--sweep_combine=product|zip] [--nosweep_finetune] \
      [--uniform_results=uniform.json | --uniform_policies=w2a2,w3a3,w4a4,w8a8] \
      [--rl_workdir=/tmp/haqjax/quickstart_rl] [--gumbel_workdir=...]

Every flag of `experiments.imagenet` (mode `gumbel`) applies; the flagfile is
the base config and `--sweep.<axis>=v1,v2,...` the swept axes (absl accepts
dotted flag names, so these are ordinary list flags). Axes: lambda
(--gumbel_lambda), budget (--budget, as a ratio of --budget_reference), seed
(the member's search key; the data order is --seed's for all), tau0, tau_min,
dual_lr, arch_lr, weight_lr, warmup_epochs, freeze_at. Without a seed axis,
member k's search key is `fold_in(PRNGKey(seed), k)`, so no two members share
Gumbel noise; with one, it is `PRNGKey(member's seed)`, the key of a standalone
search with `--seed` set to it. Members are the
cartesian product of the axes (first axis slowest), or with
--sweep_combine=zip the axes position by position (one length, or 1).

The K searches train as one jit-compiled, vmapped step
(`haqjax.search.gumbel.sweep`); each member's argmax policy is brought within
its own budget, then (unless --nosweep_finetune) fine-tuned and tested with
the shared fine-tune stage (`haqjax.jobs.stages`), one member after another. Outputs in --workdir:

  search/              the stacked search: checkpoints/ (per epoch),
                       epochs.jsonl (one line per member and epoch), steps.jsonl
  members/mNN/         policy.json and finetune/ of member NN
  uniform/wXaY/        fine-tunes of --uniform_policies (same recipe)
  sweep.jsonl, .csv    one row per member: swept values, cost, accuracies
  plots/pareto.png     test top-1 vs cost: members, uniform points, RL, Gumbel
  results.json         everything above, written last
  report.md            the table

A rerun with the same --workdir resumes: the search from its last epoch end,
then every unfinished fine-tune.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Any

import jax

from haqjax import data as haq_data
from haqjax import hardware
from haqjax import io as haq_io
from haqjax import report
from haqjax import units
from haqjax.hardware import budget as budget_lib
from haqjax.jobs import gumbel as gumbel_job
from haqjax.jobs import stages
from haqjax.jobs import uniform as uniform_lib
from haqjax.search import scoring
from haqjax.search.config import SearchConfig
from haqjax.search.gumbel import sweep as sweep_lib
from haqjax.search.gumbel.config import RESUMABLE_CHANGES
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.train import trainer
from haqjax.train.config import Config

# ------------------------------------------------------------------ members


def member_configs(config: Config, search: SearchConfig, gumbel: GumbelConfig,
                   values: dict[str, float]) -> tuple[int, SearchConfig, GumbelConfig]:
  """`(seed, search, gumbel)` of one member: the base configs with its values."""
  label = member_label(values)
  changes = {sweep_lib.AXES[a]: v for a, v in values.items()
             if sweep_lib.AXES[a].startswith("gumbel_")}
  try:
    member_gumbel = gumbel.replace(**changes)
    member_search = search.replace(budget=values["budget"]) if "budget" in values \
        else search
    member_search.budget_spec()
  except ValueError as e:
    raise ValueError(f"sweep member {label}: {e}") from None
  return int(values.get("seed", config.seed)), member_search, member_gumbel


def member_keys(seed: int, values: list[dict[str, float]]) -> jax.Array:
  """The members' search keys `[K]`: each its own (see the module docstring)."""
  base = jax.random.PRNGKey(seed)
  return jax.numpy.stack([
      jax.random.PRNGKey(int(v["seed"])) if "seed" in v else jax.random.fold_in(base, k)
      for k, v in enumerate(values)])


def member_label(values: dict[str, float]) -> str:
  return ",".join(f"{a}={v:g}" for a, v in values.items())


def _read_json(path: str, flag: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise ValueError(f"{flag}={path!r} does not exist")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{flag}={path!r} is not JSON: {e}") from None


def _job_point(workdir: str, flag: str, group: str) -> dict[str, Any]:
  r = _read_json(os.path.join(workdir, "results.json"), flag)
  for key in ("cost", "cost_ratio", "test_top1"):
    if key not in r:
      raise ValueError(f"{flag}={workdir!r}: its results.json has no {key!r}; allowed: "
                       "the workdir of a finished rl or gumbel job")
  return {"label": group.upper() if group == "rl" else group, "group": group,
          "cost": r["cost"], "top1": r["test_top1"], "cost_ratio": r["cost_ratio"],
          "search_seconds": r.get("search_seconds"), "budget": r.get("budget"),
          "source": workdir}


# -------------------------------------------------------------------- sweep


def sweep_and_evaluate(config: Config, search: SearchConfig, gumbel: GumbelConfig,
                       spec: sweep_lib.SweepSpec, workdir: str, *, finetune: bool = True,
                       uniform_results: str | None = None,
                       uniform_policies: tuple[str, ...] = (),
                       rl_workdir: str | None = None, gumbel_workdir: str | None = None,
                       command: str | None = None) -> dict[str, Any]:
  """FP32 model -> K vmapped searches -> K fine-tunes -> table and Pareto plot.

  Args:
    config: training settings (mode 'gumbel'), as `experiments.imagenet`.
    search: target, base budget, bit range and the fine-tune.
    gumbel: the base differentiable search.
    spec: the swept axes.
    workdir: where everything goes; a rerun resumes.
    finetune: fine-tune and test each member's policy.
    uniform_results: a JSON file of uniform points for the plot.
    uniform_policies: uniform policies to fine-tune here for the plot.
    rl_workdir, gumbel_workdir: finished search jobs to put on the plot.
    command: the command line to print in the report.

  Returns:
    The figures written to `results.json`.
  """
  if config.mode != "gumbel":
    raise ValueError(f"mode={config.mode!r}; a sweep runs differentiable searches, "
                     "allowed: gumbel")
  values = spec.members()
  members = [member_configs(config, search, gumbel, v) for v in values]
  for name in uniform_policies:
    uniform_lib.bits_of(name)
  walls = []

  def check(splits, table, wall):
    gumbel_job.check(config, search, gumbel, splits)
    for v, (_, s, _) in zip(values, members):
      try:
        walls.append(stages.build_wall(config, s, table))
      except ValueError as e:
        raise ValueError(f"sweep member {member_label(v)}: {e}") from None
    if uniform_results:
      uniform_lib.read_results(uniform_results, wall)
    for flag, path in (("--rl_workdir", rl_workdir), ("--gumbel_workdir", gumbel_workdir)):
      if path:
        _job_point(path, flag, "check")

  setup = stages.prepare(
      config, search, workdir,
      extra=[("gumbel_config.json", gumbel, RESUMABLE_CHANGES),
             ("sweep.json", spec, frozenset())],
      check=check)
  splits, wall = setup.splits, setup.wall
  fp32_val = stages.fp32_val_top1(config, search, setup)
  model = trainer.build_model(stages.qat_config(config, search, policy="w8a8"),
                              splits.spec.num_classes)
  gsearch = gumbel_job.build_search(config, gumbel, model, setup.table.names, wall)
  steps_per_epoch = haq_data.num_batches(splits.train, config.batch_size,
                                         drop_remainder=True)
  plan = gumbel_job.schedule(gumbel, steps_per_epoch)
  hparams = sweep_lib.stack([
      gumbel_job.make_hparams(g, w.limit, steps_per_epoch)
      for (_, _, g), w in zip(members, walls)])
  keys = member_keys(config.seed, values)
  t0 = time.perf_counter()
  variables = stages.start_variables(config, model, splits, setup.fp32_dir,
                                     gsearch.calibration_policies())
  state = sweep_lib.init(gsearch, keys, hparams, variables)
  show = config.progress if config.progress is not None else os.isatty(2)
  result = sweep_lib.run(
      gsearch, hparams, state, train=splits.train,
      val=scoring.subset(splits.val, search.search_val_size), walls=walls,
      directory=os.path.join(setup.workdir, "search"), batch_size=config.batch_size,
      total_steps=plan["total"], seed=config.seed, eval_batch_size=config.eval_batch_size,
      fp32_top1=fp32_val, log_every=config.log_every_steps, progress=show,
      tensorboard=config.tensorboard)
  search_seconds = time.perf_counter() - t0
  print(f"sweep search: {len(members)} members x {plan['total']} steps in "
        f"{search_seconds:.0f} s", file=sys.stderr, flush=True)

  rows = []
  for i, (v, (seed, s, g), w) in enumerate(zip(values, members, walls)):
    last = result.epochs[i][-1]
    msetup = dataclasses.replace(setup, workdir=os.path.join(setup.workdir, "members",
                                                             f"m{i:02d}"),
                                 wall=w, timings={})
    os.makedirs(msetup.workdir, exist_ok=True)
    policy_path, cost = stages.save_search_policy(
        config, s, msetup, result.policies[i],
        {"algorithm": "gumbel-sweep", "member": i, "values": v, "seed": seed,
         "relaxation": g.gumbel_relaxation, "epoch": last["epoch"], "step": last["step"],
         "val_top1": last["val_top1"], "fp32_val_top1": fp32_val,
         "argmax_w_bits": last["argmax_w_bits"], "argmax_a_bits": last["argmax_a_bits"],
         "argmax_cost_ratio": last["argmax_cost_ratio"], "enforced": last["enforced"]})
    member_policy = result.policies[i]
    row = {"member": i, "label": member_label(v), **v,
           "budget_ratio": s.budget, "limit": w.limit, "cost": cost["cost"],
           "cost_ratio": cost["ratio"],
           "fits": bool(w.fits(member_policy.w_bits, member_policy.a_bits)),
           "argmax_cost_ratio": last["argmax_cost_ratio"], "enforced": last["enforced"],
           "search_val_top1": last["val_top1"], "test_top1": None, "val_top1": None,
           "finetune_seconds": None,
           "w_bits": "-".join(map(str, last["w_bits"])),
           "a_bits": "-".join(map(str, last["a_bits"]))}
    if finetune:
      print(f"fine-tune member {i} ({row['label']}): {row['cost_ratio']:.3f} x "
            f"{search.budget_reference}", file=sys.stderr, flush=True)
      done = stages.finetune(config, s, msetup, policy_path)
      row.update(test_top1=done["test_top1"], val_top1=done.get("val_top1"),
                 finetune_seconds=msetup.timings["finetune_seconds"])
    rows.append(row)

  uniform = uniform_lib.read_results(uniform_results, wall) if uniform_results else []
  for name in uniform_policies:
    print(f"fine-tune uniform {name}", file=sys.stderr, flush=True)
    done = uniform_lib.finetune_uniform(config, search, setup, name,
                                        os.path.join(setup.workdir, "uniform", name))
    uniform = [p for p in uniform if p["label"] != name]
    uniform.append({"label": name, "group": "uniform", "top1": done["test_top1"],
                    "cost": done["cost"], "source": done["directory"]})
  uniform.sort(key=lambda p: p["cost"])
  others = [_job_point(p, f, g) for p, f, g in ((rl_workdir, "--rl_workdir", "rl"),
                                                 (gumbel_workdir, "--gumbel_workdir",
                                                  "gumbel")) if p]

  accuracy = "test_top1" if finetune else "search_val_top1"
  points = [{"label": r["label"], "group": "sweep", "cost": r["cost"],
             "top1": r[accuracy]} for r in rows]
  front = report.pareto_front(points)
  comparison = []
  for u in uniform:
    best = _best_within(points, u["cost"])
    comparison.append({"uniform": u["label"], "cost": u["cost"], "uniform_top1": u["top1"],
                       **best, "delta": None if best["best_member_top1"] is None
                       else best["best_member_top1"] - u["top1"]})
  unit = hardware.base.UNITS[search.budget_metric]
  os.makedirs(os.path.join(setup.workdir, "plots"), exist_ok=True)
  report.plot_pareto(
      os.path.join(setup.workdir, "plots", "pareto.png"), uniform + others + points,
      metric=search.budget_metric, unit=unit,
      title=(f"{config.model} on {config.dataset}, {search.target}: "
             f"{len(rows)}-member Gumbel sweep"
             + ("" if finetune else " (members: search val top-1, not fine-tuned)")))
  _write_table(setup.workdir, rows)
  results = {
      "mode": "gumbel-sweep", "model": config.model, "dataset": config.dataset,
      "target": search.target, "metric": search.budget_metric, "unit": unit,
      "budget_reference": search.budget_reference, "reference": wall.reference,
      "sweep": spec.to_dict(), "members": len(rows), "finetuned": finetune,
      "accuracy": accuracy, "fp32_test_top1": setup.fp32.get("test_top1"),
      "fp32_val_top1": fp32_val, "search_steps": plan["total"],
      "search_seconds": search_seconds, "trace_counts": result.trace_counts,
      "rows": rows, "uniform": uniform, "others": others,
      "front": [p["label"] for p in front], "uniform_comparison": comparison,
      "finetune_seconds": sum(r["finetune_seconds"] or 0.0 for r in rows),
      "total_seconds": time.perf_counter() - setup.t_start,
  }
  haq_io.write_json(os.path.join(setup.workdir, "results.json"), results)
  text = markdown_table(results)
  with haq_io.atomic_open(os.path.join(setup.workdir, "report.md")) as f:
    f.write(f"# Gumbel sweep: {config.model} on {config.dataset}\n\n"
            f"Reproduce: `{command or ' '.join(shlex.quote(a) for a in sys.argv)}`\n\n"
            f"{text}\n![Pareto](plots/pareto.png)\n")
  return results


def _best_within(points, cost: float) -> dict[str, Any]:
  """The best member at or below `cost` (the budgets' relative slack)."""
  within = [p for p in points if budget_lib.within(p["cost"], cost)]
  if not within:
    return {"best_member": None, "best_member_top1": None, "member_cost": None}
  best = max(within, key=lambda p: p["top1"])
  return {"best_member": best["label"], "best_member_top1": best["top1"],
          "member_cost": best["cost"]}


def _write_table(workdir: str, rows: list[dict[str, Any]]) -> None:
  haq_io.write_jsonl(os.path.join(workdir, "sweep.jsonl"), rows)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with haq_io.atomic_open(os.path.join(workdir, "sweep.csv")) as f:
    out = csv.DictWriter(f, fieldnames=columns)
    out.writeheader()
    out.writerows(rows)


def _pct(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
  """The members, then the uniform comparison, as markdown (costs in readable units)."""
  ref = results["budget_reference"]
  raw = results["unit"]
  costs = [r["cost"] for r in results["rows"]]
  costs += [c["cost"] for c in results["uniform_comparison"]]
  costs += [o["cost"] for o in results["others"]]
  factor, unit = units.scale(raw, costs)
  cell = lambda c: units.format_number(c * factor)
  lines = [f"| member | values | budget (x {ref}) | cost ({unit}) | cost (x {ref}) | "
           f"search val top-1 | test top-1 | W bits | A bits |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    lines.append(f"| {r['member']} | {r['label']} | {r['budget_ratio']:g} | "
                 f"{cell(r['cost'])} | {r['cost_ratio']:.3f} | "
                 f"{_pct(r['search_val_top1'])} | {_pct(r['test_top1'])} | "
                 f"{r['w_bits']} | {r['a_bits']} |")
  if results["uniform_comparison"]:
    lines += ["", f"| uniform | cost ({unit}) | uniform top-1 | best member at <= cost | "
              "its top-1 |", "|---|---|---|---|---|"]
    for c in results["uniform_comparison"]:
      lines.append(f"| {c['uniform']} | {cell(c['cost'])} | "
                   f"{_pct(c['uniform_top1'])} | {c['best_member'] or '-'} | "
                   f"{_pct(c['best_member_top1'])} |")
  for o in results["others"]:
    lines.append(f"\n{o['label']}: {_pct(o['top1'])} at {units.format_cost(o['cost'], raw)}"
                 f" ({o['source']})")
  return "\n".join(lines) + "\n"
