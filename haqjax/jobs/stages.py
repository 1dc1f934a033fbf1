"""The stages every search job shares: prepare, fine-tune, save, report.

A search job (`haqjax.jobs.rl`, `haqjax.jobs.gumbel`, `haqjax.jobs.sweep`)
is these stages around its own search, each resumable (a rerun with the same
workdir picks up where the last one stopped and never redoes a finished
stage):

  prepare             checks every config and the budget before any training,
                      saves the configs and `layers.json`, then trains (or
                      reads, `init_from`) the FP32 model into `fp32/`
  save_search_policy  `policy.json`: bits, cost, budget and the search's figures
  finetune            QAT of the policy from the FP32 weights, then test, in
                      `finetune/` (also the uniform policies of
                      `haqjax.jobs.uniform`, each in a folder of its own);
                      with `seeds` K > 1, K seeds as one vmapped job
                      (`haqjax.train.seeds`), member 0 exported
  export_stage        the fine-tuned model as an integer model in `export/`,
                      scored on the test split (`haqjax.jobs.export`), so the
                      reported test top-1 is the deployed model's
  common_results      the figures every job reports (per-layer costs included,
                      so reports read them instead of rebuilding the budget)
  write_report        `results.json`, then `report.md` and `report.html`,
                      and the summary on stderr
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from haqjax import configs
from haqjax import data as haq_data
from haqjax import hardware
from haqjax import io as haq_io
from haqjax import report
from haqjax.jobs import export as export_lib
from haqjax.jobs import seeds as seeds_job
from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.policy import save_policy
from haqjax.report import run_report
from haqjax.report import versus_uniform
from haqjax.search import env as env_lib
from haqjax.search import scoring
from haqjax.search.config import RESUMABLE_CHANGES
from haqjax.search.config import SearchConfig
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import steps
from haqjax.train import seeds as seeds_lib
from haqjax.train import trainer
from haqjax.train.config import Config


def read_json(path: str) -> dict[str, Any] | None:
  """The JSON object in `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_saved(saved_config, filename: str, resumable: frozenset, workdir: str) -> None:
  """Refuses a workdir whose saved `filename` holds other (non-resumable) values."""
  saved = read_json(os.path.join(workdir, filename))
  if saved is None:
    return
  # Flag by flag (nested configs flattened), as JSON holds the values; a
  # field newer than the saved file holds its default there (for configs
  # that have defaults for all their fields), or the value that the runs
  # before it had, where the class names one (`legacy_values`).
  cls = type(saved_config)
  as_json = lambda c: json.loads(json.dumps(configs.flatten(cls, c.to_dict())))
  try:
    defaults = as_json(cls())
  except (TypeError, ValueError):  # A required field: no default config.
    defaults = {}
  defaults.update(getattr(cls, "legacy_values", {}))
  saved = {**defaults, **configs.flatten(cls, saved)}
  for key, value in as_json(saved_config).items():
    if key not in resumable and saved.get(key) != value:
      raise ValueError(f"workdir {workdir!r} holds a search with {key}={saved.get(key)!r}, "
                       f"not {value!r}; use another --workdir to keep both")


def train_stage(config: Config, workdir: str, seeds: int = 1) -> dict[str, Any]:
  """Runs (or resumes) a training stage; a finished one is read back.

  With `seeds` K > 1, the K-seed job of `haqjax.train.seeds` (seeds
  `config.seed, ..., config.seed + K - 1`); a folder finished with other
  seeds trains only the members it lacks.
  """
  done = read_json(os.path.join(workdir, "results.json"))
  if seeds == 1:
    return done if done is not None else trainer.train_and_evaluate(config, workdir)
  wanted = list(seeds_lib.seed_list(config.seed, seeds))
  if done is not None and done.get("seeds") == wanted:
    return done
  return seeds_lib.train_and_evaluate_seeds(config, workdir, wanted)


def build_wall(config: Config, search: SearchConfig, table) -> env_lib.BudgetWall:
  """Costs, budget and fixed layers of a config (validated before any training)."""
  target = hardware.get_target(search.target)
  # Costs at the target's batch size (HAQ: 1 on the edge, 16 in the cloud).
  layers = hardware.from_layer_table(table, batch=int(getattr(target, "batch", 1)))
  fixed = env_lib.Fixed.create(len(table), mode=search.quantization,
                               first_layer_w8=config.first_layer_w8,
                               last_layer_w8a8=config.last_layer_w8a8)
  return env_lib.BudgetWall(target, layers, search.budget_spec(),
                            min_bits=search.min_bits, max_bits=search.max_bits,
                            fixed=fixed, order=search.wall_order)


def qat_config(config: Config, search: SearchConfig, **changes: Any) -> Config:
  """The QAT config of the search's scoring and of the final fine-tune."""
  weight = "kmeans" if search.quantization == "kmeans" else config.weight_quantizer
  return config.replace(mode="qat", weight_quantizer=weight, **changes)


@dataclasses.dataclass
class Setup:
  """What every search job shares once its FP32 stage is done.

  Attributes:
    workdir: the job's folder (absolute).
    splits: the dataset.
    table: the model's layer table.
    wall: costs, budget and fixed layers.
    fp32_dir: the FP32 run (`init_from`, or `fp32/` in the workdir).
    fp32: its results (empty when `init_from` has none).
    timings: seconds per stage so far (`fp32_seconds`, ...).
    t_start: `time.perf_counter()` at the job's start.
  """
  workdir: str
  splits: Any
  table: Any
  wall: env_lib.BudgetWall
  fp32_dir: str
  fp32: dict[str, Any]
  timings: dict[str, float]
  t_start: float


def prepare(config: Config, search: SearchConfig, workdir: str, *,
            extra: Sequence[tuple[str, Any, frozenset]] = (),
            check: Callable[[Any, Any, env_lib.BudgetWall], None] | None = None,
            ) -> Setup:
  """Checks everything, saves the configs, then runs (or reads) the FP32 stage.

  Args:
    config: training settings.
    search: budget, bit range and fine-tune settings.
    workdir: the job's folder; a rerun resumes.
    extra: `(filename, config, resumable fields)` of further configs to save
      beside `search_config.json` (and check on resume).
    check: `check(splits, table, wall)`, the search's own checks; runs before
      anything is written.
  """
  workdir = os.path.abspath(workdir)
  trainer.check_workdir(config, workdir)
  check_saved(search, "search_config.json", RESUMABLE_CHANGES, workdir)
  for filename, saved_config, resumable in extra:
    check_saved(saved_config, filename, resumable, workdir)
  t_start = time.perf_counter()
  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         manual_dir=config.manual_dir, val_size=config.val_size,
                         split_seed=config.split_seed)
  if not len(splits.val):
    raise ValueError("val_size=0: the search scores policies on a held-out split "
                     "carved from train; allowed: val_size > 0")
  model = trainer.build_model(config.replace(mode="train"), splits.spec.num_classes)
  table = layer_table(model, (1, *splits.spec.image_shape))
  wall = build_wall(config, search, table)  # Checks the budget first.
  if check is not None:
    check(splits, table, wall)
  os.makedirs(workdir, exist_ok=True)
  config.save(os.path.join(workdir, "config.json"))
  search.save(os.path.join(workdir, "search_config.json"))
  for filename, saved_config, _ in extra:
    saved_config.save(os.path.join(workdir, filename))
  haq_io.write_json(os.path.join(workdir, "layers.json"), table.rows())

  t0 = time.perf_counter()
  if config.init_from:
    fp32_dir = config.init_from
    fp32 = read_json(os.path.join(fp32_dir, "results.json")) or {}
  else:
    fp32_dir = os.path.join(workdir, "fp32")
    fp32 = train_stage(config.replace(mode="train", policy=None), fp32_dir)
  return Setup(workdir=workdir, splits=splits, table=table, wall=wall,
               fp32_dir=fp32_dir, fp32=fp32,
               timings={"fp32_seconds": time.perf_counter() - t0}, t_start=t_start)


def fp32_val_top1(config: Config, search: SearchConfig, setup: Setup) -> float:
  """The FP32 model's top-1 on the search's held-out split."""
  fp32_val = setup.fp32.get("val_top1")
  # A run named by init_from may have used another validation split.
  if fp32_val is None or search.search_val_size or config.init_from:
    fp32_val = fp32_top1(config, setup.splits, search, setup.fp32_dir)
  return float(fp32_val)


def save_search_policy(config: Config, search: SearchConfig, setup: Setup,
                       policy: Policy, meta: dict[str, Any]) -> tuple[str, dict[str, float]]:
  """Writes `policy.json` (bits, cost, budget, `meta` as "search"); returns its path and cost."""
  wall = setup.wall
  cost = wall.describe(policy.w_bits, policy.a_bits)
  budget = search.budget_spec()
  path = os.path.join(setup.workdir, "policy.json")
  save_policy(path, policy, model=config.model,
              num_classes=setup.splits.spec.num_classes,
              input_shape=list(setup.splits.spec.image_shape), target=search.target,
              budget={"metric": budget.metric, "value": budget.value,
                      "kind": budget.kind, "reference": budget.reference,
                      "limit": wall.limit, "unit": hardware.base.UNITS[budget.metric]},
              cost=cost["cost"], cost_ratio=cost["ratio"], search=meta)
  return path, cost


def finetune(config: Config, search: SearchConfig, setup: Setup,
             policy_path: str, seeds: int = 1) -> dict[str, Any]:
  """The final QAT of the policy from the FP32 weights, then test (resumable).

  `seeds` K > 1: K fine-tunes as one vmapped job (`train_stage`), whose
  results hold the members' mean, std and figures.
  """
  t0 = time.perf_counter()
  finetune_config = qat_config(
      config, search, policy=policy_path, init_from=setup.fp32_dir,
      epochs=search.finetune_epochs, learning_rate=search.finetune_learning_rate,
      warmup_epochs=0.0)
  directory = os.path.join(setup.workdir, "finetune")
  check_finetuned_policy(directory, policy_path)
  finetuned = train_stage(finetune_config, directory, seeds)
  setup.timings["finetune_seconds"] = time.perf_counter() - t0
  return finetuned


def check_finetuned_policy(directory: str, policy_path: str) -> None:
  """Refuses a fine-tune folder that holds another policy (a search extended
  with more episodes after its fine-tune finished found a new best one)."""
  done = read_json(os.path.join(directory, "policy.json"))
  if done is None:
    return
  bits = lambda d: [(l["w_bits"], l["a_bits"]) for l in d["layers"]]
  if bits(done) != bits(read_json(policy_path)):
    raise ValueError(
        f"{directory} holds the fine-tune of another policy than {policy_path} "
        "(the search found a new best one); move that folder away to fine-tune "
        "the new policy")


def export_stage(config: Config, setup: Setup, directory: str, finetuned: dict[str, Any],
                 enabled: bool, timing: str = "export_seconds") -> dict[str, Any]:
  """The integer model of `directory/finetune/`, in `directory/export/` (resumable).

  Args:
    config: the job's config (`eval_batch_size`).
    setup: the job's (splits; the seconds go to `setup.timings[timing]`).
    directory: the folder holding the fine-tune (the workdir, or a uniform
      policy's folder).
    finetuned: the fine-tune's results (its fake-quant `test_top1`).
    enabled: False (`--noexport`): nothing is exported.
    timing: the timings key the seconds are added to.

  Returns:
    The test top-1 keys of `haqjax.jobs.export.final_top1`, `export` the
    folder relative to the workdir.
  """
  if not enabled:
    return export_lib.final_top1(finetuned, None)
  # K seeds: one member is exported (`haqjax.jobs.seeds`).
  run, member = os.path.join(directory, "finetune"), finetuned
  if "seeds" in finetuned:
    run = seeds_lib.member_dir(run, finetuned["seeds"][seeds_lib.exported_member(finetuned)])
    member = read_json(os.path.join(run, "results.json"))
  t0 = time.perf_counter()
  try:
    exported = export_lib.export_finished(
        run, directory, setup.splits,
        batch_size=config.eval_batch_size, fake_quant_top1=member["test_top1"])
  except Exception as e:  # pylint: disable=broad-except
    exported = export_lib.failure(e)  # The search's results are still written.
  setup.timings[timing] = setup.timings.get(timing, 0.0) + time.perf_counter() - t0
  top1 = export_lib.final_top1(member, exported)
  if member is not finetuned:
    top1 = seeds_job.seeds_top1(finetuned, top1)
  if top1["export"] is not None:
    top1["export"] = os.path.relpath(os.path.join(directory, top1["export"]), setup.workdir)
  return top1


def common_results(mode: str, config: Config, search: SearchConfig, setup: Setup,
                   policy: Policy, cost: dict[str, float], fp32_val: float,
                   finetuned: dict[str, Any], top1: dict[str, Any]) -> dict[str, Any]:
  """The results every search job reports (its own keys go beside them).

  `top1` holds `export_stage`'s keys: `test_top1` is the integer model's
  when it was exported, `test_top1_fake_quant` the fine-tune's; top-5 and
  validation figures are the fine-tune's (fake-quant).
  """
  wall = setup.wall
  budget = search.budget_spec()
  return {
      "mode": mode, "model": config.model, "dataset": config.dataset,
      "target": search.target, "budget": str(budget), "limit": wall.limit,
      "budget_reference": budget.reference, "unit": hardware.base.UNITS[budget.metric],
      "cost": cost["cost"], "cost_ratio": cost["ratio"],
      "fits": bool(wall.fits(policy.w_bits, policy.a_bits)),
      # Per layer, in the budget metric's unit, summing to `cost`.
      "layer_costs": [float(c) for c in wall.layer_costs(policy.w_bits, policy.a_bits)],
      "policy": policy.to_dict()["layers"],
      "fp32_test_top1": setup.fp32.get("test_top1"), "fp32_val_top1": fp32_val,
      **top1, "test_top5": finetuned["test_top5"], "val_top1": finetuned.get("val_top1"),
      # K seeds: seeds, test_top1_/val_top1_ mean, std and members.
      **seeds_lib.summary_keys(finetuned),
  }


def fp32_top1(config: Config, splits, search: SearchConfig, fp32_dir: str) -> float:
  """The FP32 model in `fp32_dir` scored on the search's held-out split."""
  variables = ckpt_lib.restore_variables(fp32_dir)
  model = trainer.build_model(config.replace(mode="train"), splits.spec.num_classes)
  evaluate = trainer.Evaluator(model, None, config.eval_batch_size)
  return evaluate(variables, scoring.subset(splits.val, search.search_val_size),
                  None)["top1"]


def start_variables(config: Config, model, splits, fp32_dir: str,
                    policy: Policy | tuple[Policy, ...]):
  """The FP32 weights, with quantizer parameters initialised and calibrated.

  The start of a search that trains the weights (the Gumbel search and
  sweep): `model`'s variables with the FP32 run's weights merged in, and
  every quantizer calibrated under `policy` on `config.calibration_batches`
  training batches; for a tuple of policies, once per policy and stacked
  (`haqjax.nn.calibrate.calibrate_candidates`).
  """
  input_shape = (1, *splits.spec.image_shape)
  tx = optax.identity()
  state = steps.init_state(jax.random.PRNGKey(config.seed), model, tx, input_shape)
  state = trainer.merge_variables(state, ckpt_lib.restore_variables(fp32_dir), tx,
                                  source=f"the FP32 model in {fp32_dir!r}",
                                  model=config.model)
  variables = state.variables()
  if scoring.has_quant_params(state.params):
    batches = itertools.islice(haq_data.batches(
        splits.train, batch_size=config.batch_size, seed=config.seed, epoch=0,
        shuffle=True, drop_remainder=False), config.calibration_batches)
    if isinstance(policy, Policy):
      variables = calibrate_lib.calibrate(model, variables, batches, policy)
    else:
      variables = calibrate_lib.calibrate_candidates(model, variables, batches, policy)
  return variables


def plot_policy(workdir: str, results: dict[str, Any], table, policy: Policy,
                title: str, reference: dict[str, Any] | None = None) -> None:
  """plots/bits.png: the policy's bits per layer (`reference`: a uniform policy's
  {label, w_bits, a_bits}, drawn as dashed lines)."""
  plots = os.path.join(workdir, "plots")
  os.makedirs(plots, exist_ok=True)
  report.plot_policy_bits(os.path.join(plots, "bits.png"), table.rows(),
                          policy.to_dict(), title=f"{title}: {results['model']}, "
                          f"{results['budget']}", reference=reference)


def write_report(workdir: str, results: dict[str, Any], command: str) -> None:
  """results.json (with the command line), then report.md and report.html; the
  summary's lines (costs in readable units) go to stderr."""
  haq_io.write_json(os.path.join(workdir, "results.json"), {**results, "command": command})
  run_report.write_report(workdir)
  for line in versus_uniform.summary_lines(results):
    print(line, file=sys.stderr, flush=True)
