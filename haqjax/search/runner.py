"""`search_and_evaluate(config, search, workdir)`: the launcher's `rl` mode.

Its stages are shared pieces (`prepare`, `save_search_policy`, `finetune`,
`common_results`, `write_report`) that every search job uses; the
differentiable search (`haqjax.search.gumbel.runner`, mode `gumbel`) swaps
only the search stage and its plots.

The whole HAQ job, each stage resumable (a rerun with the same workdir picks
up where the last one stopped and never redoes a finished stage):

  fp32/          FP32 training (skipped when `config.init_from` names a run)
  search/        the RL search: checkpoints/, episodes.jsonl, TensorBoard
  policy.json    the best policy, with its cost, budget and accuracies
  finetune/      QAT of the best policy from the FP32 weights
  plots/         bits.png (per-layer bits) and search.png (reward, cost)
  results.json   every stage's figures, written last
  report.md      a readable summary with the command that reproduces the run,
                 and report.html, the same as one self-contained page
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from haqjax import data as haq_data
from haqjax import hardware
from haqjax import io as haq_io
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.policy import save_policy
from haqjax.search import env as env_lib
from haqjax.search import scoring
from haqjax.search.config import RESUMABLE_CHANGES
from haqjax.search.config import SearchConfig
from haqjax.search.rl import search as rl_search
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import trainer
from haqjax.train.config import Config


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _check_saved(saved_config, filename: str, resumable: frozenset, workdir: str) -> None:
  """Refuses a workdir whose saved `filename` holds other (non-resumable) values."""
  saved = _read_json(os.path.join(workdir, filename))
  if saved is None:
    return
  for key, value in saved_config.to_dict().items():
    if key not in resumable and saved.get(key) != value:
      raise ValueError(f"workdir {workdir!r} holds a search with {key}={saved.get(key)!r}, "
                       f"not {value!r}; use another --workdir to keep both")


def _check_search_workdir(search: SearchConfig, workdir: str) -> None:
  _check_saved(search, "search_config.json", RESUMABLE_CHANGES, workdir)


def _stage(config: Config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a training stage; a finished one is read back."""
  done = _read_json(os.path.join(workdir, "results.json"))
  if done is not None:
    return done
  return trainer.train_and_evaluate(config, workdir)


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
                            fixed=fixed)


def build_problem(config: Config, search: SearchConfig, table, fp32_top1: float,
                  ) -> rl_search.Problem:
  """The RL search space and budget of a config (validated before any training)."""
  return rl_search.Problem(
      names=table.names, observations=env_lib.observations(table, search.quantization),
      mode=search.quantization, min_bits=search.min_bits, max_bits=search.max_bits,
      wall=build_wall(config, search, table), fp32_top1=fp32_top1,
      episodes=search.search_episodes, ddpg=search.ddpg(), seed=config.seed)


def _check_scoring(config: Config, search: SearchConfig, splits) -> None:
  """The scorer's checks that need no weights, before any training."""
  if search.search_scorer != "qat":
    return
  available = haq_data.num_batches(splits.train, config.batch_size, drop_remainder=True)
  if search.search_finetune_steps > available:
    raise ValueError(f"search_finetune_steps={search.search_finetune_steps} needs "
                     f"{search.search_finetune_steps} batches of {config.batch_size}; "
                     f"the training split has {available}")


def _search_config(config: Config, search: SearchConfig, **changes: Any) -> Config:
  """The QAT config of the search's scoring and of the final fine-tune."""
  weight = "kmeans" if search.quantization == "kmeans" else config.weight_quantizer
  return config.replace(mode="qat", weight_quantizer=weight, **changes)


def make_scorer(config: Config, search: SearchConfig, splits, fp32_dir: str):
  """The episode scorer the config asks for."""
  variables = ckpt_lib.restore_variables(fp32_dir)
  val = scoring.subset(splits.val, search.search_val_size)
  if search.search_scorer == "ptq":
    from haqjax.ptq import pipeline  # pylint: disable=g-import-not-at-top
    from haqjax.ptq import runner as ptq_runner  # pylint: disable=g-import-not-at-top
    ptq_config = config.replace(mode="ptq", policy="w8a8", init_from=fp32_dir)
    model = trainer.build_model(ptq_config, splits.spec.num_classes)
    batches = ptq_runner.calibration_batches(splits, ptq_config)
    return pipeline.PTQScorer(model, variables, batches, val,
                              options=ptq_runner.options_from_config(ptq_config),
                              eval_batch_size=config.eval_batch_size)
  qat = _search_config(config, search, policy="w8a8")
  model = trainer.build_model(qat, splits.spec.num_classes)
  return scoring.QATScorer(
      model, variables, splits.train, val, num_steps=search.search_finetune_steps,
      batch_size=config.batch_size, learning_rate=search.search_finetune_lr,
      momentum=config.momentum, weight_decay=config.weight_decay,
      eval_batch_size=config.eval_batch_size, seed=config.seed,
      calibration_batches=config.calibration_batches, model_name=config.model)


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
  _check_search_workdir(search, workdir)
  for filename, saved_config, resumable in extra:
    _check_saved(saved_config, filename, resumable, workdir)
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
    fp32 = _read_json(os.path.join(fp32_dir, "results.json")) or {}
  else:
    fp32_dir = os.path.join(workdir, "fp32")
    fp32 = _stage(config.replace(mode="train", policy=None), fp32_dir)
  return Setup(workdir=workdir, splits=splits, table=table, wall=wall,
               fp32_dir=fp32_dir, fp32=fp32,
               timings={"fp32_seconds": time.perf_counter() - t0}, t_start=t_start)


def fp32_val_top1(config: Config, search: SearchConfig, setup: Setup) -> float:
  """The FP32 model's top-1 on the search's held-out split."""
  fp32_val = setup.fp32.get("val_top1")
  # A run named by init_from may have used another validation split.
  if fp32_val is None or search.search_val_size or config.init_from:
    fp32_val = _fp32_top1(config, setup.splits, search, setup.fp32_dir)
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
             policy_path: str) -> dict[str, Any]:
  """The final QAT of the policy from the FP32 weights, then test (resumable)."""
  t0 = time.perf_counter()
  finetune_config = _search_config(
      config, search, policy=policy_path, init_from=setup.fp32_dir,
      epochs=search.finetune_epochs, learning_rate=search.finetune_learning_rate,
      warmup_epochs=0.0)
  directory = os.path.join(setup.workdir, "finetune")
  _check_finetuned_policy(directory, policy_path)
  finetuned = _stage(finetune_config, directory)
  setup.timings["finetune_seconds"] = time.perf_counter() - t0
  return finetuned


def _check_finetuned_policy(directory: str, policy_path: str) -> None:
  """Refuses a fine-tune folder that holds another policy (a search extended
  with more episodes after its fine-tune finished found a new best one)."""
  done = _read_json(os.path.join(directory, "policy.json"))
  if done is None:
    return
  bits = lambda d: [(l["w_bits"], l["a_bits"]) for l in d["layers"]]
  if bits(done) != bits(_read_json(policy_path)):
    raise ValueError(
        f"{directory} holds the fine-tune of another policy than {policy_path} "
        "(the search found a new best one); move that folder away to fine-tune "
        "the new policy")


def common_results(mode: str, config: Config, search: SearchConfig, setup: Setup,
                   policy: Policy, cost: dict[str, float], fp32_val: float,
                   finetuned: dict[str, Any]) -> dict[str, Any]:
  """The results every search job reports (its own keys go beside them)."""
  wall = setup.wall
  budget = search.budget_spec()
  return {
      "mode": mode, "model": config.model, "dataset": config.dataset,
      "target": search.target, "budget": str(budget), "limit": wall.limit,
      "unit": hardware.base.UNITS[budget.metric],
      "cost": cost["cost"], "cost_ratio": cost["ratio"],
      "fits": bool(wall.fits(policy.w_bits, policy.a_bits)),
      "policy": policy.to_dict()["layers"],
      "fp32_test_top1": setup.fp32.get("test_top1"), "fp32_val_top1": fp32_val,
      "test_top1": finetuned["test_top1"], "test_top5": finetuned["test_top5"],
      "val_top1": finetuned.get("val_top1"),
  }


def search_and_evaluate(config: Config, search: SearchConfig, workdir: str,
                        command: str | None = None) -> dict[str, Any]:
  """FP32 model -> RL search -> fine-tune of the best policy -> test -> report.

  Args:
    config: training settings (mode 'rl'); `epochs`, `learning_rate`, ...
      train the FP32 model unless `init_from` names a finished FP32 run.
    search: the budget, the search and the final fine-tune.
    workdir: where everything goes; a rerun resumes.
    command: the command line to print in the report (default: sys.argv).

  Returns:
    The figures written to `results.json`.
  """
  setup = prepare(config, search, workdir,
                  check=lambda splits, table, wall: _check_scoring(config, search, splits))
  scorer = make_scorer(config, search, setup.splits, setup.fp32_dir)
  fp32_val = fp32_val_top1(config, search, setup)
  problem = build_problem(config, search, setup.table, fp32_val)

  t0 = time.perf_counter()
  show = config.progress if config.progress is not None else os.isatty(2)
  result = rl_search.run(problem, scorer, os.path.join(setup.workdir, "search"),
                         progress=show, tensorboard=config.tensorboard)
  setup.timings["search_seconds"] = time.perf_counter() - t0
  policy_path, cost = save_search_policy(
      config, search, setup, result.policy,
      {"episode": result.best["episode"], "reward": result.best["reward"],
       "val_top1": result.best["top1"], "fp32_val_top1": fp32_val})
  finetuned = finetune(config, search, setup, policy_path)

  episodes = result.records
  results = {
      **common_results("rl", config, search, setup, result.policy, cost, fp32_val,
                       finetuned),
      "search_val_top1": result.best["top1"], "best_reward": result.best["reward"],
      "best_episode": result.best["episode"], "episodes": len(episodes),
      "episodes_per_minute": (60.0 * len(episodes) / sum(r["seconds"] for r in episodes)),
      "trace_counts": result.trace_counts,
      **setup.timings, "total_seconds": time.perf_counter() - setup.t_start,
  }
  write_outputs(setup.workdir, results, setup.table, result, problem, search,
                command or " ".join(shlex.quote(a) for a in sys.argv))
  return results


def _fp32_top1(config: Config, splits, search: SearchConfig, fp32_dir: str) -> float:
  variables = ckpt_lib.restore_variables(fp32_dir)
  model = trainer.build_model(config.replace(mode="train"), splits.spec.num_classes)
  evaluate = trainer.Evaluator(model, None, config.eval_batch_size)
  return evaluate(variables, scoring.subset(splits.val, search.search_val_size),
                  None)["top1"]


def plot_policy(workdir: str, results: dict[str, Any], table, policy: Policy,
                title: str) -> None:
  """plots/bits.png: the policy's bits per layer."""
  from haqjax import report  # pylint: disable=g-import-not-at-top
  plots = os.path.join(workdir, "plots")
  os.makedirs(plots, exist_ok=True)
  report.plot_policy_bits(os.path.join(plots, "bits.png"), table.rows(),
                          policy.to_dict(), title=f"{title}: {results['model']}, "
                          f"{results['budget']}")


def write_outputs(workdir: str, results: dict[str, Any], table, result, problem,
                  search: SearchConfig, command: str) -> None:
  """The RL search's plots, results.json, report.md and report.html."""
  from haqjax import report  # pylint: disable=g-import-not-at-top
  unit = hardware.base.UNITS[search.budget_metric]
  plot_policy(workdir, results, table, result.policy, "HAQ policy")
  report.plot_search_progress(
      os.path.join(workdir, "plots", "search.png"), result.records,
      budget={"metric": search.budget_metric, "unit": unit,
              "limit": problem.wall.limit, "label": results["budget"]},
      title=f"HAQ search on {search.target}")
  write_report(workdir, results, command)


def write_report(workdir: str, results: dict[str, Any], command: str) -> None:
  """results.json (with the command line), then report.md and report.html."""
  from haqjax.report import run_report  # pylint: disable=g-import-not-at-top
  haq_io.write_json(os.path.join(workdir, "results.json"), {**results, "command": command})
  run_report.write_report(workdir)
