"""The differentiable search loop: steps, epochs, checkpoints, logs.

`run(search, hparams, state, ...)` trains weights and architecture logits
(`learning.GumbelSearch.train_step`, jitted once) over the training split
for `total_steps` steps. At every epoch's end it derives the argmax policy,
brings it within the budget with the budget wall (`BudgetWall.enforce`, as
the RL search does), scores it on the held-out split, and checkpoints the
whole search state with orbax, synchronously, beside the records. A process
killed at any point resumes from the last epoch end; data order depends only
on (seed, epoch) and step `t` draws from `fold_in(key, t)`, so a resumed
search ends where an uninterrupted one does.

Outputs in `directory`: `checkpoints/`, `epochs.jsonl` (one record per
finished epoch), `steps.jsonl` (the mean metrics and the bit probabilities
every `log_every` steps), both rewritten from the checkpoint on resume, and
`metrics.jsonl` plus TensorBoard scalars.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm

from haqjax import data as haq_data
from haqjax import io as haq_io
from haqjax import parallel
from haqjax.policy import Policy
from haqjax.search import env as env_lib
from haqjax.search.gumbel.learning import GumbelSearch
from haqjax.search.gumbel.learning import GumbelState
from haqjax.search.gumbel.learning import HParams
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import writers
from haqjax.train.trainer import Evaluator

REWARD_SCALE = 0.1  # As the RL search: 0.1 * (top-1 - FP32 top-1), percent points.


@dataclasses.dataclass(frozen=True)
class Result:
  """The derived policy and the search's records.

  Attributes:
    policy: the argmax policy of the final logits, within the budget.
    argmax: `(w_bits, a_bits)` of the argmax policy before enforcement.
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


def _jsonl(path: str, records) -> None:
  with haq_io.atomic_open(path) as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


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
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  mesh = parallel.data_mesh()
  parallel.check_batch_size("batch_size", batch_size, mesh)
  sharding = parallel.batch_sharding(mesh)
  steps_per_epoch = haq_data.num_batches(train, batch_size, drop_remainder=True)
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={batch_size} is larger than the training split "
                     f"({len(train)} examples)")
  leaves, treedef = jax.tree.flatten(state)
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=2)
  epochs: list[dict[str, Any]] = []
  step_records: list[dict[str, Any]] = []
  if checkpointer.latest_step() is not None:
    restored, meta = checkpointer.restore({"leaves": leaves})
    state = jax.tree.unflatten(treedef, list(restored["leaves"]))
    epochs, step_records = list(meta["epochs"]), list(meta["steps"])
  state = parallel.replicate(state, mesh)
  _jsonl(os.path.join(directory, "epochs.jsonl"), epochs)
  _jsonl(os.path.join(directory, "steps.jsonl"), step_records)
  writer = writers.create_writer(directory, tensorboard=tensorboard)

  traces = {"train": 0}

  def train_step(state, batch, hparams):
    traces["train"] += 1
    return search.train_step(state, batch, hparams)

  train_step = jax.jit(train_step, donate_argnums=0)
  evaluate = Evaluator(search.model, sharding, eval_batch_size)
  step = int(state.step)
  bar = tqdm.tqdm(total=total_steps, initial=step, disable=not progress,
                  desc="gumbel search", unit="step", dynamic_ncols=True)
  running, t_start, t_epoch = [], time.perf_counter(), time.perf_counter()
  try:
    while step < total_steps:
      epoch, skip = divmod(step, steps_per_epoch)
      for batch in haq_data.batches(train, batch_size=batch_size, seed=seed, epoch=epoch,
                                    shuffle=True, drop_remainder=True, sharding=sharding,
                                    start=skip):
        state, metrics = train_step(state, batch, hparams)
        running.append(metrics)
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == total_steps:
          fetched = jax.device_get(running)
          means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
          w_probs, a_probs = jax.device_get(search.probabilities(state.logits))
          step_records.append({"step": step, **means, "w_probs": _floats(w_probs),
                               "a_probs": _floats(a_probs)})
          with open(os.path.join(directory, "steps.jsonl"), "a") as f:
            f.write(json.dumps(step_records[-1]) + "\n")
          writer.write_scalars(step, {f"search/{k}": v for k, v in means.items()})
          bar.set_postfix(cost=f"{means['cost_ratio']:.3f}x", tau=f"{means['tau']:.2f}",
                          top1=f"{100 * means['top1']:.1f}")
          running = []
        if step == total_steps:
          break
      record = _epoch_record(search, wall, evaluate, state, val, epoch, step, fp32_top1)
      record["seconds"] = time.perf_counter() - t_epoch
      t_epoch = time.perf_counter()
      epochs.append(record)
      checkpointer.save(step, {"leaves": jax.tree.leaves(state)},
                        {"epochs": epochs, "steps": step_records})
      checkpointer.wait()
      with open(os.path.join(directory, "epochs.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
      writer.write_scalars(step, {
          "search/epoch": epoch + 1, "search/val_top1": record["val_top1"],
          "search/policy_cost": record["cost"],
          "search/policy_cost_ratio": record["cost_ratio"],
          "search/argmax_cost_ratio": record["argmax_cost_ratio"]})
      writer.flush()
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  if not epochs:
    raise ValueError("gumbel_epochs gives 0 steps; allowed: at least one step")
  last = epochs[-1]
  return Result(policy=Policy.create(search.names, last["w_bits"], last["a_bits"]),
                argmax=(last["argmax_w_bits"], last["argmax_a_bits"]), epochs=epochs,
                steps=step_records, seconds=time.perf_counter() - t_start,
                trace_counts={**traces, "eval": evaluate.traces})


def _epoch_record(search: GumbelSearch, wall: env_lib.BudgetWall, evaluate: Evaluator,
                  state: GumbelState, val: haq_data.Split, epoch: int, step: int,
                  fp32_top1: float) -> dict[str, Any]:
  """The derived policy of `state`, within the budget, scored on `val`."""
  w0, a0 = search.derive(jax.device_get(state.logits))
  w0, a0 = wall.fixed.apply(w0, a0)
  w, a = wall.enforce(w0, a0)
  policy = Policy.create(search.names, w, a)
  metrics = evaluate({"params": state.params, "batch_stats": state.batch_stats}, val,
                     policy)
  cost = wall.describe(w, a)
  argmax_cost = wall.describe(w0, a0)
  w_probs, a_probs = jax.device_get(search.probabilities(state.logits))
  return {
      "epoch": epoch, "step": step, "val_top1": metrics["top1"],
      "reward": REWARD_SCALE * (metrics["top1"] - fp32_top1),
      "cost": cost["cost"], "cost_ratio": cost["ratio"], "limit": cost["limit"],
      "argmax_cost": argmax_cost["cost"], "argmax_cost_ratio": argmax_cost["ratio"],
      "expected_cost": float(search.expected_cost(state.logits)),
      "enforced": bool(argmax_cost["cost"] != cost["cost"]),
      "multiplier": float(state.multiplier),
      "w_bits": [int(b) for b in w], "a_bits": [int(b) for b in a],
      "argmax_w_bits": [int(b) for b in w0], "argmax_a_bits": [int(b) for b in a0],
      "w_probs": _floats(w_probs), "a_probs": _floats(a_probs),
  }
