"""The resumable step loop that a search and a sweep share.

`train` runs a jitted `(state, batch, hparams) -> (state, metrics)` step for
`total_steps` steps over the training split, in the data order of (seed,
epoch), so a resumed loop sees the batches an uninterrupted one would. Every
`log_every` steps it averages the metrics and hands them to the caller's
`log` (one record for `steps.jsonl`, scalars, progress-bar fields); at every
epoch's end (and after the last step) the caller's `end_epoch` scores the
state and returns its records, and the loop checkpoints the state with orbax
beside all records, synchronously. On a rerun in the same directory it
restores the last checkpoint and rewrites `epochs.jsonl` and `steps.jsonl`
to exactly the checkpointed records, so no line from after it survives.

One search (`single.run`) and the sweep (`sweep.run`) differ only in the
step (plain or vmapped over members) and in what they record.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import os
import time
from typing import Any

import jax
from jax.sharding import NamedSharding
import numpy as np
import tqdm

from haqjax import data as haq_data
from haqjax import io as haq_io
from haqjax import parallel
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import divergence
from haqjax.train import writers
from haqjax.typing import PyTree

Record = dict[str, Any]
# ([metrics of each step since the last log], state) -> (steps.jsonl record,
# scalars, progress-bar fields).
LogFn = Callable[[list[dict[str, Any]], PyTree], tuple[Record, dict[str, float],
                                                         dict[str, str]]]
# (host state, epoch, step, seconds) -> (the epoch's records, scalars).
EndEpochFn = Callable[[PyTree, int, int, float], tuple[Any, dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What `train` returns.

  Attributes:
    state: the final state, on the host.
    epochs: the records `end_epoch` returned, one entry per finished epoch,
      restored ones included.
    steps: the `steps.jsonl` records, restored ones included.
    seconds: wall time of this call's steps and epoch ends.
    traces: how often the step was traced (1 for a whole run).
  """
  state: PyTree
  epochs: list[Any]
  steps: list[Record]
  seconds: float
  traces: int


def batch_sharding(batch_size: int) -> NamedSharding:
  """The sharding of training batches over the data mesh (checks the size)."""
  mesh = parallel.data_mesh()
  parallel.check_batch_size("batch_size", batch_size, mesh)
  return parallel.batch_sharding(mesh)


def train(step_fn: Callable[..., tuple[PyTree, dict[str, Any]]], state: PyTree,
          hparams: PyTree, *, train_split: haq_data.Split, directory: str,
          batch_size: int, total_steps: int, seed: int, log_every: int, log: LogFn,
          end_epoch: EndEpochFn, epoch_lines: Callable[[list[Any]], list[Record]],
          progress: bool, tensorboard: bool, desc: str) -> Outcome:
  """Runs (or resumes) the loop; see the module docstring.

  Args:
    step_fn: the training step, not jitted; `train` jits it once.
    state: the initial state (ignored when `directory` holds a checkpoint).
    hparams: the step's hyper-parameters.
    train_split: the split the step trains on.
    directory: where the loop writes; a rerun resumes from it.
    batch_size: training batch size.
    total_steps: length of the run.
    seed: data order.
    log_every: steps between `log` calls.
    log: turns the metrics since the last call into a step record.
    end_epoch: scores the state at an epoch's end.
    epoch_lines: the `epochs.jsonl` lines of a list of epoch entries.
    progress: show a progress bar.
    tensorboard: also write TensorBoard scalars.
    desc: the progress bar's label.

  Returns:
    The final state and the records.

  Raises:
    ValueError: if the training split has no full batch, or `total_steps`
      is 0.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  sharding = batch_sharding(batch_size)
  steps_per_epoch = haq_data.num_batches(train_split, batch_size, drop_remainder=True)
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={batch_size} is larger than the training split "
                     f"({len(train_split)} examples)")
  epochs_path = os.path.join(directory, "epochs.jsonl")
  steps_path = os.path.join(directory, "steps.jsonl")
  leaves, treedef = jax.tree.flatten(state)
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=2)
  epochs: list[Any] = []
  step_records: list[Record] = []
  if checkpointer.latest_step() is not None:
    restored, meta = checkpointer.restore({"leaves": leaves})
    state = jax.tree.unflatten(treedef, list(restored["leaves"]))
    epochs, step_records = list(meta["epochs"]), list(meta["steps"])
  state = parallel.replicate(state, parallel.data_mesh())
  haq_io.write_jsonl(epochs_path, epoch_lines(epochs))
  haq_io.write_jsonl(steps_path, step_records)
  last_checkpoint = (checkpointer.path(checkpointer.latest_step())
                     if checkpointer.latest_step() is not None else None)
  writer = writers.create_writer(directory, tensorboard=tensorboard)

  traces = [0]

  def counted(state, batch, hparams):
    traces[0] += 1
    return step_fn(state, batch, hparams)

  jitted = jax.jit(counted, donate_argnums=0)
  step = int(np.asarray(state.step).reshape(-1)[0])
  bar = tqdm.tqdm(total=total_steps, initial=step, disable=not progress, desc=desc,
                  unit="step", dynamic_ncols=True)
  running, t_start, t_epoch = [], time.perf_counter(), time.perf_counter()
  try:
    while step < total_steps:
      epoch, skip = divmod(step, steps_per_epoch)
      for batch in haq_data.batches(train_split, batch_size=batch_size, seed=seed,
                                    epoch=epoch, shuffle=True, drop_remainder=True,
                                    sharding=sharding, start=skip):
        state, metrics = jitted(state, batch, hparams)
        running.append(metrics)
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == total_steps:
          fetched = jax.device_get(running)
          for i, m in enumerate(fetched):  # Losses `[]`, or `[K]` in a sweep.
            divergence.check_finite(np.max(np.asarray(m["loss"])),
                                    step - len(fetched) + 1 + i, last_checkpoint)
          record, scalars, postfix = log(fetched, state)
          step_records.append({"step": step, **record})
          haq_io.append_jsonl(steps_path, step_records[-1:])
          writer.write_scalars(step, scalars)
          bar.set_postfix(**postfix)
          running = []
        if step == total_steps:
          break
      divergence.check_state_finite(state, step, last_checkpoint)
      entry, scalars = end_epoch(jax.device_get(state), epoch, step,
                                 time.perf_counter() - t_epoch)
      t_epoch = time.perf_counter()
      epochs.append(entry)
      checkpointer.save(step, {"leaves": jax.tree.leaves(state)},
                        {"epochs": epochs, "steps": step_records})
      checkpointer.wait()
      last_checkpoint = checkpointer.path(step)
      haq_io.append_jsonl(epochs_path, epoch_lines([entry]))
      writer.write_scalars(step, scalars)
      writer.flush()
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  if not epochs:
    raise ValueError("gumbel_epochs gives 0 steps; allowed: at least one step")
  return Outcome(state=jax.device_get(state), epochs=epochs, steps=step_records,
                 seconds=time.perf_counter() - t_start, traces=traces[0])
