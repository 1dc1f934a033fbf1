"""K differentiable searches as one vmapped step: hyper-parameter sweeps.

A sweep is a list of members, each a set of values of the swept axes
(`AXES`: penalty weight, budget ratio, seed, temperatures, learning rates,
schedule points). Every swept value is an array of `supernet.HParams` or the
search key, so K members share one compiled step::

    step = jax.jit(jax.vmap(search.train_step, in_axes=(0, None, 0)))
    states, metrics = step(states, batch, stacked_hparams)

with parameters, BatchNorm statistics, logits, optimizer states, multipliers
and keys stacked along a leading `[K]` axis, and one batch shared by all
members (the data order is the base config's `seed`; a swept seed changes the
member's search key: its Gumbel noise and stochastic rounding). Member `k`
therefore takes exactly the steps a standalone search (`single.run`) with its
hyper-parameters and key takes on the same data.

`SweepSpec` expands the axes into members, as their cartesian product
(`combine='product'`, the first axis varying slowest) or position by
position (`combine='zip'`, all axes of one length, or of length 1, which
broadcasts). `run` trains the stacked searches, and at every epoch's end
derives each member's policy within the member's own budget (`derive.py`,
as a single search does), scores it on the held-out split and checkpoints
the stacked state, so a killed sweep resumes from the last epoch end; a
finished sweep resumed with another derivation derives its final policies
again.

References:
  Cai & Vasconcelos. Rethinking Differentiable Search for Mixed-Precision
  Neural Networks. CVPR 2020. https://arxiv.org/abs/2004.05795
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from haqjax import data as haq_data
from haqjax import io as haq_io
from haqjax.policy import Policy
from haqjax.search import env as env_lib
from haqjax.search.gumbel import step_loop
from haqjax.search.gumbel import single
from haqjax.search.gumbel.supernet import GumbelSearch
from haqjax.search.gumbel.supernet import GumbelState
from haqjax.search.gumbel.supernet import HParams
from haqjax.train.trainer import Evaluator
from haqjax.typing import PyTree

# Sweep axis -> the config field it sets ("seed": the member's search key).
AXES = {
    "lambda": "gumbel_lambda",
    "budget": "budget",
    "seed": "seed",
    "tau0": "gumbel_tau0",
    "tau_min": "gumbel_tau_min",
    "dual_lr": "gumbel_dual_lr",
    "arch_lr": "gumbel_arch_lr",
    "weight_lr": "gumbel_weight_lr",
    "warmup_epochs": "gumbel_warmup_epochs",
    "freeze_at": "gumbel_freeze_at",
}
COMBINES = ("product", "zip")
MAX_MEMBERS = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSpec:
  """The swept axes and how they combine into members.

  Attributes:
    axes: `(axis, values)` pairs, axis in `AXES`, values a non-empty tuple
      of numbers (integers for 'seed').
    combine: 'product' (every combination, first axis slowest) or 'zip'
      (position by position; axes of length 1 broadcast).
  """
  axes: tuple[tuple[str, tuple[float, ...]], ...]
  combine: str = "product"

  def __post_init__(self):
    if not self.axes:
      raise ValueError("no sweep axis given; allowed: one or more of "
                       + ", ".join(f"--sweep.{a}" for a in AXES))
    if self.combine not in COMBINES:
      raise ValueError(f"sweep_combine={self.combine!r}; allowed: {', '.join(COMBINES)}")
    for name, values in self.axes:
      if name not in AXES:
        raise ValueError(f"sweep axis {name!r} is unknown; allowed: {', '.join(AXES)}")
      if not values:
        raise ValueError(f"sweep.{name} has no values; allowed: comma-separated numbers")
      if name == "seed" and any(v != int(v) or v < 0 for v in values):
        raise ValueError(f"sweep.seed={','.join(map(str, values))}; allowed: "
                         "non-negative integers")
    if len({name for name, _ in self.axes}) != len(self.axes):
      raise ValueError("a sweep axis is given twice; allowed: each axis once")
    if self.combine == "zip":
      lengths = {len(v) for _, v in self.axes if len(v) > 1}
      if len(lengths) > 1:
        raise ValueError("sweep_combine='zip' needs axes of one length (or 1); got "
                         + ", ".join(f"sweep.{n}: {len(v)}" for n, v in self.axes))
    if len(self.members()) > MAX_MEMBERS:
      raise ValueError(f"the sweep has {len(self.members())} members; allowed: at most "
                       f"{MAX_MEMBERS}")

  @classmethod
  def parse(cls, texts: dict[str, Sequence[str] | None], combine: str = "product"
            ) -> SweepSpec:
    """From `{axis: ["0.1", "0.2"] or None}` (the `--sweep.<axis>` flags)."""
    axes = []
    for name, items in texts.items():
      if items is None:
        continue
      try:
        values = tuple(float(v) for v in items)
      except ValueError:
        raise ValueError(f"sweep.{name}={','.join(items)}; allowed: comma-separated "
                         "numbers, e.g. 0.1,0.3") from None
      axes.append((name, values))
    return cls(axes=tuple(axes), combine=combine)

  def members(self) -> list[dict[str, float]]:
    """One `{axis: value}` per member, in sweep order."""
    names = [n for n, _ in self.axes]
    if self.combine == "product":
      rows = itertools.product(*(v for _, v in self.axes))
    else:
      k = max(len(v) for _, v in self.axes)
      rows = zip(*(v * k if len(v) == 1 else v for _, v in self.axes))
    return [dict(zip(names, row)) for row in rows]

  def to_dict(self) -> dict[str, Any]:
    return {"axes": {n: list(v) for n, v in self.axes}, "combine": self.combine}

  def save(self, path: str | os.PathLike) -> None:
    haq_io.write_json(path, self.to_dict())


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Stacks pytrees of one structure along a new leading `[K]` axis."""
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def member(tree: PyTree, k: int) -> PyTree:
  """Member `k` of a stacked pytree."""
  return jax.tree.map(lambda x: x[k], tree)


def init(search: GumbelSearch, keys: jax.Array, hparams: HParams,
         variables: PyTree) -> GumbelState:
  """The stacked initial states: `keys` `[K]`, `hparams` stacked, shared `variables`."""
  return jax.vmap(search.init, in_axes=(0, 0, None))(keys, hparams, variables)


@dataclasses.dataclass(frozen=True)
class SweepResult:
  """Each member's derived policy and the sweep's records.

  Attributes:
    policies: per member, the argmax policy of its final logits, within its
      budget.
    epochs: per member, one record per epoch (as `single.run` writes).
    steps: one record per logging interval, each metric a `[K]` list.
    seconds: wall time of this call's training and scoring.
    trace_counts: how often the stacked train step and the eval step were
      traced.
  """
  policies: list[Policy]
  epochs: list[list[dict[str, Any]]]
  steps: list[dict[str, Any]]
  seconds: float
  trace_counts: dict[str, int]


def run(search: GumbelSearch, hparams: HParams, state: GumbelState, *,
        train: haq_data.Split, val: haq_data.Split, walls: Sequence[env_lib.BudgetWall],
        directory: str, batch_size: int, total_steps: int, seed: int = 0,
        eval_batch_size: int = 500, fp32_top1: float = 0.0, log_every: int = 100,
        progress: bool = False, tensorboard: bool = True) -> SweepResult:
  """Runs (or resumes) K stacked searches; see the module docstring.

  Args:
    search: the static search, shared by all members.
    hparams: the members' hyper-parameters, stacked `[K]`.
    state: the stacked initial states (`init`); ignored when `directory`
      holds a checkpoint.
    train: the split all members train on (one shared batch per step).
    val: the held-out split that scores each member's derived policy.
    walls: per member, its costs and budget (the budget wall that brings
      its argmax policy within its budget).
    directory: where the sweep writes; a rerun resumes from it.
    batch_size: training batch size.
    total_steps: length of every member's search.
    seed: data order.
    eval_batch_size: evaluation batch size.
    fp32_top1: the FP32 model's top-1 on `val` (for the reward column).
    log_every: steps between step records.
    progress: show a progress bar.
    tensorboard: also write TensorBoard scalars.

  Returns:
    The members' policies and the records.

  Raises:
    ValueError: if `walls` does not have one wall per member, or the
      training split has no full batch.
  """
  k = int(np.shape(hparams.limit)[0])
  if len(walls) != k:
    raise ValueError(f"{len(walls)} budget walls for {k} sweep members")
  evaluate = Evaluator(search.model, step_loop.batch_sharding(batch_size), eval_batch_size)

  def log(fetched, state):
    del state
    means = {name: np.mean([m[name] for m in fetched], axis=0)  # [K]
             for name in fetched[0]}
    scalars = {f"sweep/{name}/{i}": float(means[name][i])
               for name in ("loss", "cost_ratio", "top1") for i in range(k)}
    return ({name: np.round(v, 6).tolist() for name, v in means.items()}, scalars,
            {"cost": " ".join(f"{c:.2f}" for c in means["cost_ratio"])})

  def end_epoch(host_state, epoch, step, seconds):
    records = []
    for i in range(k):
      record = single.epoch_record(
          search, walls[i], evaluate, member(host_state, i), val, epoch, step, fp32_top1)
      record["seconds"] = seconds
      records.append(record)
    return records, {f"sweep/val_top1/{i}": r["val_top1"] for i, r in enumerate(records)}

  def epoch_lines(entries):
    return [{"member": i, **r} for records in entries for i, r in enumerate(records)]

  outcome = step_loop.train(
      jax.vmap(search.train_step, in_axes=(0, None, 0)), state, hparams,
      train_split=train, directory=directory, batch_size=batch_size,
      total_steps=total_steps, seed=seed, log_every=log_every, log=log,
      end_epoch=end_epoch, epoch_lines=epoch_lines, progress=progress,
      tensorboard=tensorboard, desc=f"gumbel sweep (K={k})")
  if any(r.get("derive", "wall") != search.derivation for r in outcome.epochs[-1]):
    last = outcome.epochs[-1]  # Records before 'derive' were the wall's.
    outcome.epochs[-1] = [
        {**single.epoch_record(search, walls[i], evaluate, member(outcome.state, i), val,
                               last[i]["epoch"], last[i]["step"], fp32_top1),
         "seconds": last[i].get("seconds")} for i in range(k)]
    haq_io.write_jsonl(os.path.join(directory, "epochs.jsonl"), epoch_lines(outcome.epochs))
  epochs = [[records[i] for records in outcome.epochs] for i in range(k)]  # [K][epochs]
  policies = [Policy.create(search.names, e[-1]["w_bits"], e[-1]["a_bits"])
              for e in epochs]
  return SweepResult(policies=policies, epochs=epochs, steps=outcome.steps,
                     seconds=outcome.seconds,
                     trace_counts={"train": outcome.traces, "eval": evaluate.traces})
