"""One differentiable search, run and checkpointed (a sweep runs K: `sweep.py`).

`run(search, hparams, state, ...)` trains weights and architecture logits
(`supernet.GumbelSearch.train_step`, jitted once, in `step_loop.train`) over the training split
for `total_steps` steps. At every epoch's end it derives a policy within the budget
from the probabilities (`derive.py`: the most probable one that fits, or the
argmax lowered by HAQ's budget wall), scores it on the held-out split, and checkpoints the
whole search state with orbax, synchronously, beside the records. A process
killed at any point resumes from the last epoch end; data order depends only
on (seed, epoch) and step `t` draws from `fold_in(key, t)`, so a resumed
search ends where an uninterrupted one does. A finished search resumed with
another derivation (`GumbelSearch.derivation`) derives and scores its final
policy again, without training.

Outputs in `directory`: `checkpoints/`, `epochs.jsonl` (one record per
finished epoch), `steps.jsonl` (the mean metrics and the bit probabilities
every `log_every` steps), both rewritten from the checkpoint on resume, and
`metrics.jsonl` plus TensorBoard scalars.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from haqjax import data as haq_data
from haqjax import io as haq_io
from haqjax.policy import Policy
from haqjax.search import env as env_lib
from haqjax.search import scoring
from haqjax.search.gumbel import derive as derive_lib
from haqjax.search.gumbel import step_loop
from haqjax.search.gumbel.supernet import GumbelSearch
from haqjax.search.gumbel.supernet import GumbelState
from haqjax.search.gumbel.supernet import HParams
from haqjax.train.trainer import Evaluator


@dataclasses.dataclass(frozen=True)
class Result:
  """The derived policy and the search's records.

  Attributes:
    policy: the final probabilities' policy within the budget (`derive.py`).
    argmax: `(w_bits, a_bits)` of the argmax policy.
    epochs: one record per epoch (derived policy, its cost and val top-1).
    steps: one record per logging interval (means, bit probabilities).
    seconds: wall time of this call's training and scoring.
    trace_counts: how often the train and eval steps were traced.
  """
  policy: Policy
  argmax: tuple[list[int], list[int]]
  epochs: list[dict[str, Any]]
  steps: list[dict[str, Any]]
  seconds: float
  trace_counts: dict[str, int]


def _floats(x) -> list:
  return np.round(np.asarray(x, np.float64), 6).tolist()


def run(search: GumbelSearch, hparams: HParams, state: GumbelState, *,
        train: haq_data.Split, val: haq_data.Split, wall: env_lib.BudgetWall,
        directory: str, batch_size: int, total_steps: int, seed: int = 0,
        eval_batch_size: int = 500, fp32_top1: float = 0.0, log_every: int = 100,
        progress: bool = False, tensorboard: bool = True) -> Result:
  """Runs (or resumes) the search; see the module docstring.

  Args:
    search: the static search (model, candidates, costs, optimizers).
    hparams: its hyper-parameters.
    state: the initial state (ignored when `directory` holds a checkpoint).
    train: the split the weights and logits train on.
    val: the held-out split that scores each epoch's derived policy.
    wall: costs and budget enforcement (fixed layers included).
    directory: where the search writes; a rerun resumes from it.
    batch_size: training batch size.
    total_steps: length of the search.
    seed: data order.
    eval_batch_size: evaluation batch size.
    fp32_top1: the FP32 model's top-1 on `val` (for the reward column).
    log_every: steps between step records.
    progress: show a progress bar.
    tensorboard: also write TensorBoard scalars.

  Returns:
    The derived policy and the records.
  """
  evaluate = Evaluator(search.model, step_loop.batch_sharding(batch_size), eval_batch_size)

  def log(fetched, state):
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    w_probs, a_probs = jax.device_get(search.probabilities(state.logits))
    record = {**means, "w_probs": _floats(w_probs), "a_probs": _floats(a_probs)}
    postfix = {"cost": f"{means['cost_ratio']:.3f}x", "tau": f"{means['tau']:.2f}",
               "top1": f"{100 * means['top1']:.1f}"}
    return record, {f"search/{k}": v for k, v in means.items()}, postfix

  def end_epoch(host_state, epoch, step, seconds):
    record = epoch_record(search, wall, evaluate, host_state, val, epoch, step, fp32_top1)
    record["seconds"] = seconds
    return record, {"search/epoch": epoch + 1, "search/val_top1": record["val_top1"],
                    "search/policy_cost": record["cost"],
                    "search/policy_cost_ratio": record["cost_ratio"],
                    "search/argmax_cost_ratio": record["argmax_cost_ratio"]}

  outcome = step_loop.train(
      search.train_step, state, hparams, train_split=train, directory=directory,
      batch_size=batch_size, total_steps=total_steps, seed=seed, log_every=log_every,
      log=log, end_epoch=end_epoch, epoch_lines=list, progress=progress,
      tensorboard=tensorboard, desc="gumbel search")
  last = outcome.epochs[-1]
  if last.get("derive", "wall") != search.derivation:  # Records before 'derive': the wall.
    last = {**epoch_record(search, wall, evaluate, outcome.state, val, last["epoch"],
                           last["step"], fp32_top1), "seconds": last.get("seconds")}
    outcome.epochs[-1] = last
    haq_io.write_jsonl(os.path.join(directory, "epochs.jsonl"), outcome.epochs)
  return Result(policy=Policy.create(search.names, last["w_bits"], last["a_bits"]),
                argmax=(last["argmax_w_bits"], last["argmax_a_bits"]),
                epochs=outcome.epochs, steps=outcome.steps, seconds=outcome.seconds,
                trace_counts={"train": outcome.traces, "eval": evaluate.traces})


def epoch_record(search: GumbelSearch, wall: env_lib.BudgetWall, evaluate: Evaluator,
                  state: GumbelState, val: haq_data.Split, epoch: int, step: int,
                  fp32_top1: float) -> dict[str, Any]:
  """The derived policy of `state`, within the budget, scored on `val`."""
  w_probs, a_probs = jax.device_get(search.probabilities(state.logits))
  w0, a0 = wall.fixed.apply(*search.derive(jax.device_get(state.logits)))
  w, a = derive_lib.derive(search.derivation, w_probs, a_probs, search.w_bits,
                           search.a_bits, wall)
  metrics = evaluate({"params": state.params, "batch_stats": state.batch_stats}, val,
                     search.eval_policy(w, a))
  cost = wall.describe(w, a)
  argmax_cost = wall.describe(w0, a0)
  return {
      "epoch": epoch, "step": step, "val_top1": metrics["top1"],
      "reward": scoring.reward(metrics["top1"], fp32_top1),
      "cost": cost["cost"], "cost_ratio": cost["ratio"], "limit": cost["limit"],
      "argmax_cost": argmax_cost["cost"], "argmax_cost_ratio": argmax_cost["ratio"],
      "expected_cost": float(search.expected_cost(state.logits)),
      "derive": search.derivation,
      "enforced": bool((w != w0).any() or (a != a0).any()),
      "multiplier": float(state.multiplier),
      "w_bits": [int(b) for b in w], "a_bits": [int(b) for b in a],
      "argmax_w_bits": [int(b) for b in w0], "argmax_a_bits": [int(b) for b in a0],
      "w_probs": _floats(w_probs), "a_probs": _floats(a_probs),
  }
