r"""Every search family against uniform at the same cost, over K seeds.

  python -m experiments.compare [--recipe=quickstart] \
      [--targets=bismo-edge,bitfusion,...] [--metrics=latency,energy,size] \
      [--budgets=w2a2,w3a3,w4a4] \
      [--families=uniform,uniform_max,rl,rl_executed,rl_saving,gumbel,gumbel_absolute,
                  gumbel_shared,gumbel_undominated,hawq,greedy,hawq_tensor,
                  greedy_tensor] \
      [--quantizer=minmax|lsq|lsq_mse] [--seeds=3] [--workdir=compare] \
      [--init_from=FP32_WORKDIR] [--quick]

For one model (the training recipe `--recipe`: its FP32 run, `--init_from`
or one trained here) and every target x metric x budget, where a budget is
the cost of a uniform policy on that target and metric, each family of
`experiments.families` finds a policy with each seed s of the K
(`config.seed, ..., config.seed + K - 1`): seed s's search (RL's agent and
scorer, Gumbel's sampling, the HAWQ and greedy sensitivity pass) gives
policy_s, fine-tuned with seed s. The budget's uniform policy is fine-tuned
over the same K seeds (and, with family `uniform_max`, the uniform policy
with the most bits that fits the budget, which is the budget's own unless a
wider one costs no more on that target), so that every family's test top-1 pairs with
uniform's seed by seed. The quantizers (`--quantizer`) and the fine-tune
(the quickstart search recipes' final one) are the same for every row.

A fine-tune depends on the policy and the seed only: each (policy, seed)
is fine-tuned once, in `policies/<bits>/seed_<s>/`, so a policy that
several families, budgets or targets share (uniform's, always) is trained
once per seed; a cell's missing ones run side by side as one vmapped job
(`haqjax.train.members`: member (policy, seed) is the standalone run). A
size budget does not depend on the target: its searches run once, on
`SHARED_TARGET`, for every target.

Written under `<workdir>/<recipe>_<quantizer>[_quick]/` (the FP32 run, when
trained here, in `<workdir>/<recipe>_fp32[_quick]/`):

  cells/<target>/<metric>/<budget>/  the searches per family and seed
      (`<family>/seed_<s>/search.json`: policy and seconds), the vmapped
      fine-tune jobs (`finetune_<hash>/`: stacked checkpoints, members.json)
      and `rows/<family>.json`, each row's figures, written last
  sensitivity_channel/seed_<s>/  the HAWQ and greedy sensitivity pass of
      seed s (`sensitivity/`: hawq_tensor's and greedy_tensor's, per tensor)
  policies/<bits>/        policy.json and `seed_<s>/results.json` per seed
  compare.csv, compare.md the table (`haqjax.report.comparison`): per row
      the cost ratio to the budget, test top-1 mean, std and members, the
      paired difference to uniform (mean and 95% Student-t interval over
      seeds) and the search's mean seconds; compare.md also has it as one
      row per budget with a column per family (`comparison.summary`),
      and, with `uniform_max`, once more paired with that row
  compare_<target>.png    mean +- std per budget and family, a panel per metric

A folder holds one comparison at a time: a second run of the same recipe
and quantizer in the same workdir stops at once with one line naming the
first, and two comparisons that share the FP32 run it trains (one per
quantizer) take turns, the second reading the first's model.

Every file is written to a temporary file, then renamed. A rerun with the
same flags reads every finished row back and resumes unfinished searches
and fine-tunes; more seeds add only the new members. `--quick` runs every
stage at toy size (`families.QUICK`); its figures say nothing about the
families. A budget at the lowest bits (W2A2 under the recipes'
--min_bits=2) leaves nothing to search: a family finds uniform's policy
again, or one no dearer.

The README's table (the quickstart on three targets that model all three
metrics, the BISMO ones model no energy; RL too over 3 seeds; the two
quantizers share the FP32 run in the workdir):

  for q in minmax lsq; do
    python -m experiments.compare --recipe=quickstart \
        --targets=bitfusion,systolic,cim --metrics=latency,energy,size \
        --budgets=w2a2,w3a3,w4a4 \
        --families=uniform,uniform_max,rl,gumbel,hawq,greedy \
        --quantizer=$q --seeds=3 --workdir=/tmp/haqjax/compare
  done
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

from absl import flags
from absl import logging

from experiments import cli
from experiments import families

_BUDGET = re.compile(r"^w([1-8])a([1-8])$")
# Metrics that depend neither on the target nor on its batch size.
SHARED_METRICS = ("size", "kmeans_size")
SHARED_TARGET = "bismo-edge"
# Rows whose policy does not depend on the seed: found once, fine-tuned over all seeds.
SEEDLESS = ("uniform", *families.BASELINES)


@dataclasses.dataclass(frozen=True)
class Grid:
  """What one comparison runs (validated by `check_grid`)."""
  recipe: str
  targets: tuple[str, ...]
  metrics: tuple[str, ...]
  budgets: tuple[str, ...]
  families: tuple[str, ...]
  quantizer: str
  seeds: tuple[int, ...]
  quick: bool = False
  init_from: str | None = None
  data_dir: str | None = None


def _choices(flag: str, values, allowed, pattern: str | None = None) -> tuple[str, ...]:
  """`values` without repeats; a one-line `ValueError` for an empty list or a stranger."""
  values = tuple(dict.fromkeys(v.strip() for v in values))
  if not values:
    raise ValueError(f"--{flag} is empty; allowed: {pattern or ', '.join(allowed)}")
  for value in values:
    if value not in allowed and not (pattern and _BUDGET.match(value)):
      raise ValueError(f"--{flag} has {value!r}; allowed: {pattern or ', '.join(allowed)}")
  return values


def check_grid(recipe: str, targets, metrics, budgets, family_names, quantizer: str,
               seeds: int, **rest: Any) -> Grid:
  """The flags as a `Grid`; a one-line `ValueError` naming flag, value and allowed ones."""
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax import hardware  # pylint: disable=g-import-not-at-top
  from haqjax.train import seeds as seeds_lib  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  try:
    recipes.recipe_path(recipe)
  except ValueError as e:
    raise ValueError(f"--recipe={recipe}: {e}") from None
  if quantizer not in families.QUANTIZERS:
    raise ValueError(f"--quantizer is {quantizer!r}; allowed: "
                     f"{', '.join(families.QUANTIZERS)}")
  count = seeds_lib.check_seeds(seeds)
  first = recipes.read_configs(recipe, (Config,))[0].seed
  return Grid(recipe=recipe,
              targets=_choices("targets", targets, tuple(hardware.PRESETS)),
              metrics=_choices("metrics", metrics, tuple(hardware.METRICS)),
              budgets=_choices("budgets", budgets, (), "wXaY with X, Y in 1..8"),
              families=("uniform", *(f for f in _choices(
                  "families", family_names,
                  families.FAMILIES + families.BASELINES + tuple(families.VARIANTS)
                  + tuple(families.HAWQ_VARIANTS))
                                     if f != "uniform")),
              quantizer=quantizer, seeds=seeds_lib.seed_list(first, count), **rest)


def _configs(grid: Grid, plan: families.Plan, fp32_dir: str | None, target: str,
             metric: str, budget: str):
  return families.configs(grid.quantizer, budget, plan, fp32_dir, grid.data_dir,
                          recipe=grid.recipe, target=target, metric=metric)


def check_walls(grid: Grid, plan: families.Plan) -> None:
  """Every target x metric x budget's budget built before any training."""
  from haqjax.data.specs import get_spec  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  config = _configs(grid, plan, None, grid.targets[0], grid.metrics[0], grid.budgets[0])[0]
  spec = get_spec(config.dataset)
  table = layer_table(trainer.build_model(config.replace(mode="train"), spec.num_classes),
                      (1, *spec.image_shape))
  for target in grid.targets:
    for metric in grid.metrics:
      for budget in grid.budgets:
        config, search, _, _ = _configs(grid, plan, None, target, metric, budget)
        try:
          stages.build_wall(config, search, table)
        except ValueError as e:
          raise ValueError(f"--targets={target} --metrics={metric} --budgets={budget}: "
                           f"{e}") from None


def member_dir(root: str, policy, seed: int) -> str:
  """The folder of `policy`'s fine-tune with `seed`: `root/policies/<bits>/seed_<seed>/`."""
  return os.path.join(root, "policies", families.policy_key(policy), f"seed_{seed}")


def finetune_members(config, search, setup, pairs, root: str, job_root: str
                     ) -> dict[tuple[str, int], dict[str, Any]]:
  """The fine-tunes of `(policy, seed)` pairs, those not yet done as one vmapped job.

  Member `(policy, seed)` is the standalone QAT run of `policy` with `seed`
  from the FP32 weights (`haqjax.train.members`: the policies side by side,
  each member with its own seed's data order and keys); its figures go to
  `member_dir(...)/results.json`, written last, so a fine-tune that two
  families, budgets or targets share runs once. The job's stacked
  checkpoints are in `job_root/finetune_<members>/` (a rerun resumes).
  A member that diverges is dropped from the job and its results hold
  `diverged` (the message naming step and metric) and no figures; the
  others train on.

  Returns:
    `{(policy_key, seed): results}` of every pair.
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.policy import save_policy  # pylint: disable=g-import-not-at-top
  from haqjax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from haqjax.train import members  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  pairs = list({(families.policy_key(p), s): (p, s) for p, s in pairs}.values())
  result = lambda p, s: os.path.join(member_dir(root, p, s), "results.json")
  pending = [(p, s) for p, s in pairs if stages.read_json(result(p, s)) is None]
  if pending:
    paths = []
    for policy, _ in pending:
      paths.append(os.path.join(os.path.dirname(member_dir(root, policy, 0)), "policy.json"))
      if not os.path.exists(paths[-1]):
        save_policy(paths[-1], policy, model=config.model)
    fconfig = stages.qat_config(config, search, policy=paths[0], init_from=setup.fp32_dir,
                                epochs=search.finetune_epochs,
                                learning_rate=search.finetune_learning_rate,
                                warmup_epochs=0.0)
    splits = setup.splits
    # As the standalone runs read them (the recipe's fixed layers applied).
    policies = [trainer.resolve_policy(fconfig.replace(policy=path), setup.table)
                for path in paths]
    model = trainer.build_model(fconfig, splits.spec.num_classes)
    per_epoch = haq_data.num_batches(splits.train, fconfig.batch_size, drop_remainder=True)
    _, _, tx = trainer.schedule_and_optimizer(fconfig, max(per_epoch, 1))
    seeds = [s for _, s in pending]
    states = members.init_members(fconfig, model, tx, splits, policies, seeds,
                                  ckpt_lib.restore_variables(setup.fp32_dir))
    names = " ".join(f"{families.policy_key(p)}/{s}" for p, s in pending)
    job = os.path.join(job_root, "finetune_" + hashlib.sha1(names.encode()).hexdigest()[:12])
    os.makedirs(job, exist_ok=True)
    haq_io.write_json(os.path.join(job, "members.json"), names.split())
    fitted = members.fit_members(fconfig, model, splits, states, members.stack(policies),
                                 seeds, job, keep_going=True)
    for k, ((policy, seed), resolved) in enumerate(zip(pending, policies)):
      test, val = fitted["test"][k] or {}, (fitted["val"][k] if fitted["val"] else None) or {}
      if k in fitted["diverged"]:
        logging.warning("%s: %s (policy %s); recorded as diverged", job,
                        fitted["diverged"][k], families.policy_key(policy))
      haq_io.write_json(result(policy, seed), {
          "mode": "qat", "model": config.model, "dataset": config.dataset,
          "policy": resolved.to_dict()["layers"], "seed": seed,
          "weight_quantizer": fconfig.weight_quantizer,
          "act_quantizer": fconfig.act_quantizer, "steps": fitted["steps"],
          "epochs": fitted["epochs"], "diverged": fitted["diverged"].get(k),
          "test_top1": test.get("top1"), "test_top5": test.get("top5"),
          "test_loss": test.get("loss"), "val_top1": val.get("top1"),
          "val_loss": val.get("loss"), "job": os.path.relpath(job, root),
          "vmapped_members": len(pending), "train_seconds": fitted["train_seconds"]})
  return {(families.policy_key(p), s): stages.read_json(result(p, s)) for p, s in pairs}


def run_cell(grid: Grid, plan: families.Plan, fp32_dir: str, root: str, target: str,
             metric: str, budget: str) -> list[dict[str, Any]]:
  """One target, metric and budget: every family's row (read back when finished)."""
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  scope = SHARED_TARGET if metric in SHARED_METRICS else target
  cell = os.path.join(root, "cells", scope, metric, budget)
  row_path = lambda family: os.path.join(cell, "rows", f"{family}.json")
  config, search, gumbel, hawq = _configs(grid, plan, fp32_dir, scope, metric, budget)
  stamps = {f: families.stamp_of(f, gumbel, hawq) for f in grid.families}
  rows = {f: stages.read_json(row_path(f)) for f in grid.families}
  todo = [f for f, r in rows.items() if r is None or r["seeds"] != list(grid.seeds)
          or not families.stamped(r, stamps[f])]
  if todo:
    setup = stages.prepare(config, search, cell)
    found = {}
    for family in todo:
      found[family] = [families.cached(
          os.path.join(cell, family, f"seed_{s}", "search.json"),
          lambda f=family, s=s: families.find(
              f, config.replace(seed=s), search, gumbel, hawq,
              dataclasses.replace(setup, workdir=os.path.join(cell, f, f"seed_{s}")),
              os.path.join(root, families.sensitivity_folder(families.hawq_of(f, hawq)),
                           f"seed_{s}")),
          stamps[family])
                       for s in (grid.seeds[:1] if family in SEEDLESS else grid.seeds)]
      if family in SEEDLESS:
        found[family] *= len(grid.seeds)
    tuned = finetune_members(
        config, search, setup, [(families.policy_of(r), seed) for family in todo
                                for seed, r in zip(grid.seeds, found[family])], root, cell)
    for family in todo:
      policies = [families.policy_of(r) for r in found[family]]
      costs = [setup.wall.describe(p.w_bits, p.a_bits) for p in policies]
      seconds = [r["seconds"] for r in found[family]]
      rows[family] = {
          "metric": metric, "budget": budget, "family": family, "scope": scope,
          "seeds": list(grid.seeds),
          "members": [tuned[families.policy_key(p), s]["test_top1"]
                      for p, s in zip(policies, grid.seeds)],
          "diverged": [tuned[families.policy_key(p), s].get("diverged")
                       for p, s in zip(policies, grid.seeds)],
          "cost_ratio": sum(c["ratio"] for c in costs) / len(costs),
          "cost_ratios": [c["ratio"] for c in costs], "costs": [c["cost"] for c in costs],
          "fits": all(bool(setup.wall.fits(p.w_bits, p.a_bits)) for p in policies),
          "search_seconds": sum(seconds) / len(seconds), "search_seconds_members": seconds,
          "policies": [{"w_bits": r["w_bits"], "a_bits": r["a_bits"]}
                       for r in found[family]], **stamps[family]}
      haq_io.write_json(row_path(family), rows[family])
  return [{**rows[f], "target": target} for f in grid.families]


def fp32_stage(grid: Grid, plan: families.Plan, workdir: str) -> str:
  """The FP32 run every search starts from: `--init_from`, else one trained once."""
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  if grid.init_from:
    return os.path.abspath(grid.init_from)
  fp32_dir = os.path.join(workdir, f"{grid.recipe}_fp32{'_quick' if grid.quick else ''}")
  epochs = {"epochs": plan.fp32_epochs} if grid.quick else {}
  # Both quantizers' comparisons start from it: a second one waits, then reads it.
  with haq_io.exclusive(fp32_dir):
    stages.train_stage(recipes.load_recipe(grid.recipe, progress=False, tensorboard=False,
                                           data_dir=grid.data_dir, **epochs), fp32_dir)
  return fp32_dir


def root_dir(grid: Grid, workdir: str) -> str:
  """Where the comparison of `grid`'s recipe and quantizer is written."""
  return os.path.join(os.path.abspath(workdir),
                      f"{grid.recipe}_{grid.quantizer}{'_quick' if grid.quick else ''}")


def run(grid: Grid, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the comparison; writes and returns its table and files."""
  from haqjax.report import comparison  # pylint: disable=g-import-not-at-top
  plan = families.QUICK if grid.quick else families.FULL
  check_walls(grid, plan)
  workdir = os.path.abspath(workdir)
  root = root_dir(grid, workdir)
  t0 = time.perf_counter()
  fp32_dir = fp32_stage(grid, plan, workdir)
  rows = [row for target in grid.targets for metric in grid.metrics
          for budget in grid.budgets
          for row in run_cell(grid, plan, fp32_dir, root, target, metric, budget)]
  lines = comparison.table(rows)
  summaries = [comparison.summary(lines, "Against the budget's uniform policy")]
  if any(r["family"] == "uniform_max" for r in rows):
    summaries.append(comparison.summary(
        comparison.table(rows, reference="uniform_max"),
        "Against the widest uniform policy within the budget (uniform_max)"))
  title = (f"{grid.recipe}, {grid.quantizer} quantizers, {len(grid.seeds)} seeds"
           f"{' (quick: toy sizes)' if grid.quick else ''}")
  files = {"csv": comparison.write_csv(os.path.join(root, "compare.csv"), lines),
           "markdown": comparison.write_markdown(os.path.join(root, "compare.md"), lines,
                                                 title, summaries),
           "plots": [comparison.plot_target(os.path.join(root, f"compare_{t}.png"), lines,
                                            t, f"{t}: {title}") for t in grid.targets]}
  print(comparison.markdown(lines, title), flush=True)
  print("\n".join(summaries), flush=True)
  print(f"{files['csv']}, {files['markdown']}, {', '.join(files['plots'])} "
        f"({time.perf_counter() - t0:.1f} s)", flush=True)
  return {"root": root, "fp32": fp32_dir, "lines": lines, **files}


def define_flags() -> None:
  """The command line's flags, defined by `python -m experiments.compare` only (an
  import defines none, so tests and other programs may import this module)."""
  flags.DEFINE_string("recipe", "quickstart", "Training recipe of the model "
                      "(experiments/flags/<name>.flags).")
  flags.DEFINE_list("targets", ["bismo-edge"], "Hardware targets.")
  flags.DEFINE_list("metrics", ["latency"], "Budget metrics.")
  flags.DEFINE_list("budgets", ["w4a4", "w3a3"], "Budgets: uniform policies whose "
                    "cost the searches may spend, wXaY.")
  flags.DEFINE_list("families", list(families.FAMILIES), "Search families (uniform is "
                    "always fine-tuned: it is the reference).")
  flags.DEFINE_string("quantizer", "minmax", "Quantizers of every row: minmax, lsq or lsq_mse.")
  flags.DEFINE_integer("seeds", 3, "K: seeds of every search and fine-tune.")
  flags.DEFINE_string("workdir", "compare", "Where everything is written.")
  flags.DEFINE_string("init_from", None, "The recipe's FP32 run (default: train one "
                      "in the workdir).")
  flags.DEFINE_string("data_dir", None, "Prepared datasets folder.")
  flags.DEFINE_bool("quick", False, "Every stage at toy size (a smoke run).")
  flags.DEFINE_string("compilation_cache", "", "JAX persistent compilation cache "
                      "('' disables; --quick: families.QUICK_CACHE).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; flags are --name=value")
  f = flags.FLAGS
  grid = check_grid(f.recipe, f.targets, f.metrics, f.budgets, f.families, f.quantizer,
                    f.seeds, quick=f.quick, init_from=f.init_from, data_dir=f.data_dir)
  import jax  # pylint: disable=g-import-not-at-top
  cli.enable_compilation_cache(f.compilation_cache)
  if grid.quick and not jax.config.jax_compilation_cache_dir:
    cli.enable_compilation_cache(families.QUICK_CACHE)
  if grid.quick:
    # Every compile is kept, also the many small ones of the sensitivity pass,
    # which each seed's pass would otherwise compile again.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cli.quiet_libraries()
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  haq_io.claim(root_dir(grid, f.workdir))  # A second run of this grid's folder stops here.
  run(grid, f.workdir)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
