"""`search_and_evaluate(config, search, workdir)`: HAQ's RL job (launcher mode `rl`).

The shared stages (`haqjax.jobs.stages`) around the DDPG search
(`haqjax.search.rl`), each resumable (a rerun with the same workdir picks up
where the last one stopped and never redoes a finished stage):

  fp32/          FP32 training (skipped when `config.init_from` names a run)
  search/        the RL search: checkpoints/, episodes.jsonl, TensorBoard
  policy.json    the best policy, with its cost, budget and accuracies
  finetune/      QAT of the best policy from the FP32 weights
  export/        the fine-tuned model as an integer model (`haqjax.jobs.export`):
                 model.onnx, model.stablehlo, encodings.json, weights.bin and
                 results.json; its test top-1 is the job's `test_top1`
                 (--noexport skips it)
  uniform_reference/
                 the same fine-tune of the uniform policy a ratio budget
                 refers to (`haqjax.jobs.uniform`; --nofinetune_uniform_reference
                 skips it)
  plots/         bits.png (per-layer bits), search.png (reward, cost) and
                 uniform.png (test top-1 vs cost, found policy and uniform)
  results.json   every stage's figures, written last
  report.md      a readable summary with the command that reproduces the run,
                 and report.html, the same as one self-contained page
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Any

from haqjax import data as haq_data
from haqjax import hardware
from haqjax import report
from haqjax.jobs import stages
from haqjax.jobs import uniform
from haqjax.ptq import pipeline
from haqjax.ptq import runner as ptq_runner
from haqjax.search import env as env_lib
from haqjax.search import scoring
from haqjax.search.config import SearchConfig
from haqjax.search.rl import search as rl_search
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import trainer
from haqjax.train.config import Config


def build_problem(config: Config, search: SearchConfig, table, fp32_top1: float,
                  ) -> rl_search.Problem:
  """The RL search space and budget of a config (validated before any training)."""
  return rl_search.Problem(
      names=table.names, observations=env_lib.observations(table, search.quantization),
      mode=search.quantization, min_bits=search.min_bits, max_bits=search.max_bits,
      wall=stages.build_wall(config, search, table), fp32_top1=fp32_top1,
      episodes=search.search_episodes, ddpg=search.ddpg, seed=config.seed)


def check_scoring(config: Config, search: SearchConfig, splits) -> None:
  """The scorer's checks that need no weights, before any training."""
  if search.search_scorer != "qat":
    return
  available = haq_data.num_batches(splits.train, config.batch_size, drop_remainder=True)
  if search.search_finetune_steps > available:
    raise ValueError(f"search_finetune_steps={search.search_finetune_steps} needs "
                     f"{search.search_finetune_steps} batches of {config.batch_size}; "
                     f"the training split has {available}")


def make_scorer(config: Config, search: SearchConfig, splits, fp32_dir: str):
  """The episode scorer the config asks for (`search_scorer`: qat or ptq)."""
  variables = ckpt_lib.restore_variables(fp32_dir)
  val = scoring.subset(splits.val, search.search_val_size)
  if search.search_scorer == "ptq":
    ptq_config = config.replace(mode="ptq", policy="w8a8", init_from=fp32_dir)
    model = trainer.build_model(ptq_config, splits.spec.num_classes)
    batches = ptq_runner.calibration_batches(splits, ptq_config)
    return pipeline.PTQScorer(model, variables, batches, val,
                              options=ptq_runner.options_from_config(ptq_config),
                              eval_batch_size=config.eval_batch_size)
  qat = stages.qat_config(config, search, policy="w8a8")
  model = trainer.build_model(qat, splits.spec.num_classes)
  return scoring.QATScorer(
      model, variables, splits.train, val, num_steps=search.search_finetune_steps,
      batch_size=config.batch_size, learning_rate=search.search_finetune_lr,
      momentum=config.momentum, weight_decay=config.weight_decay,
      eval_batch_size=config.eval_batch_size, seed=config.seed,
      calibration_batches=config.calibration_batches, model_name=config.model)


def search_and_evaluate(config: Config, search: SearchConfig, workdir: str,
                        command: str | None = None, *, export: bool = True,
                        seeds: int = 1) -> dict[str, Any]:
  """FP32 model -> RL search -> fine-tune of the best policy -> test -> report.

  With a ratio budget of a uniform wXaY, that uniform policy is fine-tuned and
  tested too (`haqjax.jobs.uniform`) and the report compares the two.

  Args:
    config: training settings (mode 'rl'); `epochs`, `learning_rate`, ...
      train the FP32 model unless `init_from` names a finished FP32 run.
    search: the budget, the search and the final fine-tune.
    workdir: where everything goes; a rerun resumes.
    command: the command line to print in the report (default: sys.argv).
    export: write the fine-tuned model's integer model to `export/`
      (`haqjax.jobs.export`) and report its test top-1, the fake-quant one
      beside it; False (`--noexport`) reports the fake-quant figures.
    seeds: fine-tune the found policy (and the uniform reference) over this
      many seeds as one vmapped job (`haqjax.train.seeds`); its test top-1
      is then the members' mean, with their std and figures beside it.

  Returns:
    The figures written to `results.json`.
  """
  def check(splits, table, wall):
    check_scoring(config, search, splits)
    uniform.check(search, wall)

  setup = stages.prepare(config, search, workdir, check=check)
  scorer = make_scorer(config, search, setup.splits, setup.fp32_dir)
  fp32_val = stages.fp32_val_top1(config, search, setup)
  problem = build_problem(config, search, setup.table, fp32_val)

  t0 = time.perf_counter()
  show = config.progress if config.progress is not None else os.isatty(2)
  result = rl_search.run(problem, scorer, os.path.join(setup.workdir, "search"),
                         progress=show, tensorboard=config.tensorboard)
  setup.timings["search_seconds"] = time.perf_counter() - t0
  policy_path, cost = stages.save_search_policy(
      config, search, setup, result.policy,
      {"episode": result.best["episode"], "reward": result.best["reward"],
       "val_top1": result.best["top1"], "fp32_val_top1": fp32_val})
  finetuned = stages.finetune(config, search, setup, policy_path, seeds)
  top1 = stages.export_stage(config, setup, setup.workdir, finetuned, export)
  versus = uniform.comparison(config, search, setup, top1, cost["cost"], export, seeds)

  episodes = result.records
  results = {
      **stages.common_results("rl", config, search, setup, result.policy, cost,
                              fp32_val, finetuned, top1),
      **versus,
      "search_val_top1": result.best["top1"], "best_reward": result.best["reward"],
      "best_episode": result.best["episode"], "episodes": len(episodes),
      "episodes_per_minute": (60.0 * len(episodes) / sum(r["seconds"] for r in episodes)),
      "trace_counts": result.trace_counts,
      **setup.timings, "total_seconds": time.perf_counter() - setup.t_start,
  }
  write_outputs(setup.workdir, results, setup.table, result, problem, search,
                command or " ".join(shlex.quote(a) for a in sys.argv))
  return results


def write_outputs(workdir: str, results: dict[str, Any], table, result, problem,
                  search: SearchConfig, command: str) -> None:
  """The RL search's plots, results.json, report.md and report.html."""
  unit = hardware.base.UNITS[search.budget_metric]
  stages.plot_policy(workdir, results, table, result.policy, "HAQ policy",
                     reference=uniform.reference_bits(search))
  uniform.plot_comparison(workdir, results, search, "HAQ (RL)")
  report.plot_search_progress(
      os.path.join(workdir, "plots", "search.png"), result.records,
      budget={"metric": search.budget_metric, "unit": unit,
              "limit": problem.wall.limit, "label": results["budget"]},
      title=f"HAQ search on {search.target}")
  stages.write_report(workdir, results, command)
