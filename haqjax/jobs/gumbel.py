"""`search_and_evaluate(config, search, gumbel, workdir)`: launcher mode `gumbel`.

The shared stages (`haqjax.jobs.stages`) around the differentiable search
(`haqjax.search.gumbel`) in place of the DDPG agent; each stage resumable:

  fp32/          FP32 training (skipped when `config.init_from` names a run)
  search/        the search: checkpoints/, epochs.jsonl, steps.jsonl,
                 metrics.jsonl, TensorBoard
  policy.json    the final probabilities' policy within the budget (the most
                 probable that fits; `--gumbel_derive`, `search.gumbel.derive`),
                 with its cost and accuracies
  finetune/      QAT of that policy from the FP32 weights, then test
  export/        the fine-tuned model as an integer model (`haqjax.jobs.export`):
                 model.onnx, model.stablehlo, encodings.json, weights.bin and
                 results.json; its test top-1 is the job's `test_top1`
                 (--noexport skips it)
  uniform_reference/
                 the same fine-tune of the uniform policy a ratio budget
                 refers to (`haqjax.jobs.uniform`; --nofinetune_uniform_reference
                 skips it)
  plots/         bits.png, search.png (per epoch: val top-1 and cost),
                 w_probs.png and a_probs.png (bit probabilities per layer),
                 uniform.png (test top-1 vs cost, found policy and uniform)
  results.json   every stage's figures, written last
  report.md      a readable summary with the command that reproduces the run,
                 and report.html, the same as one self-contained page

The search starts from the FP32 weights and trains them together with the
logits (`haqjax.search.gumbel.supernet`), so it needs no per-policy fine-tunes: its cost is a
few epochs of QAT with K fake-quantizers per tensor. With
`--gumbel_quantizers=per_candidate` (the default) each of the K is a quantizer
of its own, calibrated at its bit-width before the search.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from typing import Any

import jax
import numpy as np

from haqjax import data as haq_data
from haqjax import hardware
from haqjax import report
from haqjax.jobs import stages
from haqjax.jobs import uniform
from haqjax.search import env as env_lib
from haqjax.search import scoring
from haqjax.search.config import SearchConfig
from haqjax.search.gumbel import single
from haqjax.search.gumbel.config import RESUMABLE_CHANGES
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.search.gumbel.supernet import GumbelSearch
from haqjax.search.gumbel.supernet import HParams
from haqjax.search.gumbel.supernet import search_candidates
from haqjax.train import trainer
from haqjax.train.config import Config


def check(config: Config, search: SearchConfig, gumbel: GumbelConfig, splits) -> None:
  """The search's own checks, before any training."""
  if search.quantization != "linear":
    raise ValueError(f"quantization={search.quantization!r}: mode 'gumbel' mixes "
                     "uniform quantizers of weights and activations; allowed: linear")
  bits = gumbel.bits()
  outside = [b for b in bits if not search.min_bits <= b <= search.max_bits]
  if outside:
    raise ValueError(f"gumbel_bits={gumbel.gumbel_bits!r} has {outside[0]}, outside "
                     f"min_bits..max_bits = {search.min_bits}..{search.max_bits}; "
                     "allowed: candidates within that range")
  if not haq_data.num_batches(splits.train, config.batch_size, drop_remainder=True):
    raise ValueError(f"batch_size={config.batch_size} is larger than the training "
                     f"split ({len(splits.train)} examples)")


def schedule(gumbel: GumbelConfig, steps_per_epoch: int) -> dict[str, int]:
  """Step counts of the search: total, warm-up, freeze point."""
  total = max(1, math.ceil(gumbel.gumbel_epochs * steps_per_epoch))
  warmup = min(int(round(gumbel.gumbel_warmup_epochs * steps_per_epoch)), total - 1)
  freeze = (int(round(gumbel.gumbel_freeze_at * steps_per_epoch))
            if gumbel.gumbel_freeze_at > 0 else total + 1)
  return {"total": total, "warmup": warmup, "freeze": freeze}


def make_hparams(gumbel: GumbelConfig, limit: float, steps_per_epoch: int) -> HParams:
  """The config's hyper-parameters as the arrays the step takes."""
  s = schedule(gumbel, steps_per_epoch)
  return HParams.create(
      # gumbel_lambda is the weight of whichever penalty form is used.
      hinge_weight=gumbel.gumbel_lambda, multiplier_init=gumbel.gumbel_lambda,
      limit=limit, tau0=gumbel.gumbel_tau0, tau_min=gumbel.gumbel_tau_min, anneal_steps=max(1, s["total"] - s["warmup"]),
      dual_lr=gumbel.gumbel_dual_lr, arch_lr=gumbel.gumbel_arch_lr,
      weight_lr=gumbel.gumbel_weight_lr, warmup_steps=s["warmup"],
      freeze_step=s["freeze"])


def build_search(config: Config, gumbel: GumbelConfig, model, names,
                 wall: env_lib.BudgetWall) -> GumbelSearch:
  """The static search of a config: candidates, their costs, the optimizers."""
  w_rows, a_rows, tensor = search_candidates(gumbel.bits(), wall,
                                             gumbel.gumbel_candidates == "undominated")
  fixed = (wall.fixed.w >= 0) | (wall.fixed.a >= 0)
  return GumbelSearch(model, names, w_rows, a_rows, tensor, fixed,
                      relaxation=gumbel.gumbel_relaxation, penalty=gumbel.gumbel_penalty,
                      derivation=gumbel.gumbel_derive,
                      momentum=config.momentum, weight_decay=config.weight_decay,
                      label_smoothing=config.label_smoothing,
                      per_candidate=gumbel.gumbel_quantizers == "per_candidate")


def search_and_evaluate(config: Config, search: SearchConfig, gumbel: GumbelConfig,
                        workdir: str, command: str | None = None, *, export: bool = True,
                        seeds: int = 1) -> dict[str, Any]:
  """FP32 model -> differentiable search -> fine-tune -> test -> report.

  With a ratio budget of a uniform wXaY, that uniform policy is fine-tuned and
  tested too (`haqjax.jobs.uniform`) and the report compares the two.

  Args:
    config: training settings (mode 'gumbel'): the FP32 stage, batch size,
      momentum, weight decay and quantizers of the search.
    search: target, budget, bit range and the final fine-tune.
    gumbel: the differentiable search.
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
  def check_all(splits, table, wall):
    check(config, search, gumbel, splits)
    uniform.check(search, wall)

  setup = stages.prepare(
      config, search, workdir, extra=[("gumbel_config.json", gumbel, RESUMABLE_CHANGES)],
      check=check_all)
  splits, wall = setup.splits, setup.wall
  fp32_val = stages.fp32_val_top1(config, search, setup)
  model = trainer.build_model(stages.qat_config(config, search, policy="w8a8"),
                              splits.spec.num_classes)
  gsearch = build_search(config, gumbel, model, setup.table.names, wall)
  steps_per_epoch = haq_data.num_batches(splits.train, config.batch_size,
                                         drop_remainder=True)
  hparams = make_hparams(gumbel, wall.limit, steps_per_epoch)
  plan = schedule(gumbel, steps_per_epoch)
  t0 = time.perf_counter()
  variables = stages.start_variables(config, model, splits, setup.fp32_dir,
                                     gsearch.calibration_policies())
  state = gsearch.init(jax.random.PRNGKey(config.seed), hparams, variables)
  show = config.progress if config.progress is not None else os.isatty(2)
  result = single.run(
      gsearch, hparams, state, train=splits.train,
      val=scoring.subset(splits.val, search.search_val_size), wall=wall,
      directory=os.path.join(setup.workdir, "search"), batch_size=config.batch_size,
      total_steps=plan["total"], seed=config.seed, eval_batch_size=config.eval_batch_size,
      fp32_top1=fp32_val, log_every=config.log_every_steps, progress=show,
      tensorboard=config.tensorboard)
  setup.timings["search_seconds"] = time.perf_counter() - t0
  last = result.epochs[-1]
  policy_path, cost = stages.save_search_policy(
      config, search, setup, result.policy,
      {"algorithm": "gumbel", "relaxation": gumbel.gumbel_relaxation,
       "epoch": last["epoch"], "step": last["step"], "val_top1": last["val_top1"],
       "fp32_val_top1": fp32_val, "argmax_w_bits": last["argmax_w_bits"],
       "argmax_a_bits": last["argmax_a_bits"],
       "argmax_cost_ratio": last["argmax_cost_ratio"], "enforced": last["enforced"]})
  finetuned = stages.finetune(config, search, setup, policy_path, seeds)
  top1 = stages.export_stage(config, setup, setup.workdir, finetuned, export)
  versus = uniform.comparison(config, search, setup, top1, cost["cost"], export, seeds)
  search_seconds = sum(r["seconds"] for r in result.epochs)
  results = {
      **stages.common_results("gumbel", config, search, setup, result.policy, cost,
                              fp32_val, finetuned, top1),
      **versus,
      "search_val_top1": last["val_top1"], "argmax_cost_ratio": last["argmax_cost_ratio"],
      "expected_cost": last["expected_cost"], "enforced": last["enforced"],
      "search_steps": plan["total"], "search_epochs": len(result.epochs),
      "steps_per_second": plan["total"] / search_seconds if search_seconds > 0 else None,
      "trace_counts": result.trace_counts,
      **setup.timings, "total_seconds": time.perf_counter() - setup.t_start,
  }
  write_outputs(setup.workdir, results, setup.table, result, wall, search, gumbel,
                command or " ".join(shlex.quote(a) for a in sys.argv))
  return results


def write_outputs(workdir: str, results: dict[str, Any], table, result,
                  wall: env_lib.BudgetWall, search: SearchConfig, gumbel: GumbelConfig,
                  command: str) -> None:
  """Plots, results.json, report.md and report.html."""
  plots = os.path.join(workdir, "plots")
  stages.plot_policy(workdir, results, table, result.policy, "Gumbel search policy",
                     reference=uniform.reference_bits(search))
  uniform.plot_comparison(workdir, results, search, "Gumbel search")
  unit = hardware.base.UNITS[search.budget_metric]
  fig = report.search_progress_figure(
      [{**r, "episode": r["epoch"]} for r in result.epochs],
      budget={"metric": search.budget_metric, "unit": unit, "limit": wall.limit,
              "label": results["budget"]},
      title=f"Gumbel search on {search.target}: derived policy per epoch")
  fig.axes[-1].set_xlabel("epoch")
  fig.savefig(os.path.join(plots, "search.png"), dpi=120)
  bits = list(gumbel.bits())
  for role, key, fixed in (("weight", "w_probs", wall.fixed.w),
                           ("activation", "a_probs", wall.fixed.a)):
    free = np.flatnonzero(fixed < 0)
    if not free.size:
      continue
    history = [(r["step"], np.asarray(r[key])[free]) for r in result.steps]
    report.plot_bit_probabilities(
        os.path.join(plots, f"{key}.png"), history,
        names=[table.names[i] for i in free], bits=bits, role=role,
        title=f"{role.capitalize()} bit-width probabilities ({gumbel.gumbel_relaxation})")
  stages.write_report(workdir, results, command)
