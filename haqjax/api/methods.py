"""The three search families on the user's model and data, as `haqjax.api` runs them.

Each `run_*` is the search step of its job (`haqjax.jobs.gumbel`,
`haqjax.jobs.rl`, `haqjax.jobs.hawq`) without the job's workdir layout,
FP32 stage or training `Config`: the model, its variables and the splits
come from `haqjax.api.search_policy`, and the searches themselves are the
library's (`haqjax.search.gumbel.single.run`, `haqjax.search.rl.run` with a
`QATScorer`, `haqjax.search.hawq`'s sensitivity pass and ILP). Each returns
the policy, within the budget wall, and the search's own figures.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from haqjax import data as haq_data
from haqjax.api import training
from haqjax.jobs import gumbel as gumbel_job
from haqjax.jobs import hawq as hawq_job
from haqjax.policy import Policy
from haqjax.search import env as env_lib
from haqjax.search import scoring
from haqjax.search.gumbel import single
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.search.gumbel.supernet import GumbelSearch
from haqjax.search.gumbel.supernet import search_candidates
from haqjax.search.hawq import measure
from haqjax.search.hawq.config import HawqConfig
from haqjax.search.hawq.problem import Problem as HawqProblem
from haqjax.search.rl import search as rl_search
from haqjax.search.rl.config import DDPGConfig
from haqjax.typing import PyTree

METHODS = ("gumbel", "rl", "hawq")


def check(model, method: str) -> None:
  """Refuses an unknown method before any work.

  Raises:
    ValueError: `method` is not one of `METHODS`.
  """
  del model  # Every method searches haqjax-layer and wrapped plain models alike.
  if method not in METHODS:
    raise ValueError(f"method is {method!r}; allowed: {', '.join(METHODS)}")


@dataclasses.dataclass(frozen=True)
class Task:
  """What every search family needs.

  Attributes:
    model: the model taking `policy=` (`training.quantize`).
    variables: its FP32 variables with quantizer parameters (not calibrated).
    train: the split weights, logits and calibrations use.
    val: the held-out split that scores policies.
    table: the model's layer table.
    wall: costs, budget and fixed layers.
    fp32_val_top1: the FP32 model's top-1 on `val`.
    directory: where a search writes its checkpoints and records.
    batch_size: training batch size.
    eval_batch_size: evaluation batch size.
    momentum, weight_decay, label_smoothing: the training recipe.
    calibration_batches: batches that calibrate static quantizers.
    seed: data order, agent and estimator keys.
    progress: show progress bars.
  """
  model: Any
  variables: PyTree
  train: haq_data.Split
  val: haq_data.Split
  table: Any
  wall: env_lib.BudgetWall
  fp32_val_top1: float
  directory: str
  batch_size: int = 128
  eval_batch_size: int = 500
  momentum: float = 0.9
  weight_decay: float = 0.0
  label_smoothing: float = 0.0
  calibration_batches: int = 4
  seed: int = 0
  progress: bool = False

  def top_policy(self, bits: int) -> Policy:
    """Every free layer at `bits`, fixed layers at theirs."""
    n = len(self.table)
    return Policy.create(self.table.names,
                         *self.wall.fixed.apply(np.full(n, bits), np.full(n, bits)))

  def calibrated(self, policy: Policy | tuple[Policy, ...]) -> PyTree:
    """The FP32 variables with the quantizers calibrated for `policy` (for each
    of a tuple's policies, stacked: `haqjax.api.training.calibrate`)."""
    return training.calibrate(self.model, self.variables, self.train, policy,
                              batch_size=self.batch_size,
                              batches=self.calibration_batches, seed=self.seed)


def gumbel_setup(task: Task, gumbel: GumbelConfig) -> tuple[GumbelSearch, int, PyTree]:
  """`(search, steps_per_epoch, variables)` of the differentiable search on `task`.

  The static search (candidates within the bit range, their costs on the
  task's wall, the optimizers) and its start: the FP32 variables calibrated
  for the search's `calibration_policies()` (at every candidate, stacked, for
  per-candidate quantizers; else at the top one), copied (the search's step donates its state, the
  user's arrays stay). A sweep (`haqjax.api.sweeps`) stacks K states of it.

  Raises:
    ValueError: a candidate bit-width outside the wall's bit range.
  """
  wall = task.wall
  bits = gumbel.bits()
  outside = [b for b in bits if not wall.min_bits <= b <= wall.max_bits]
  if outside:
    raise ValueError(f"gumbel_bits={gumbel.gumbel_bits!r} has {outside[0]}, outside "
                     f"min_bits..max_bits = {wall.min_bits}..{wall.max_bits}; allowed: "
                     "candidates within that range")
  w_rows, a_rows, tensor = search_candidates(bits, wall,
                                             gumbel.gumbel_candidates == "undominated")
  search = GumbelSearch(
      task.model, task.table.names, w_rows, a_rows, tensor,
      (wall.fixed.w >= 0) | (wall.fixed.a >= 0), relaxation=gumbel.gumbel_relaxation,
      penalty=gumbel.gumbel_penalty, derivation=gumbel.gumbel_derive, momentum=task.momentum,
      weight_decay=task.weight_decay, label_smoothing=task.label_smoothing,
      per_candidate=gumbel.gumbel_quantizers == "per_candidate")
  per_epoch = haq_data.num_batches(task.train, task.batch_size, drop_remainder=True)
  variables = jax.tree.map(jnp.copy, task.calibrated(search.calibration_policies()))
  return search, per_epoch, variables


def run_gumbel(task: Task, gumbel: GumbelConfig) -> tuple[Policy, dict[str, Any]]:
  """The differentiable search (`haqjax.jobs.gumbel`'s search step)."""
  wall = task.wall
  search, per_epoch, variables = gumbel_setup(task, gumbel)
  hparams = gumbel_job.make_hparams(gumbel, wall.limit, per_epoch)
  plan = gumbel_job.schedule(gumbel, per_epoch)
  state = search.init(jax.random.PRNGKey(task.seed), hparams, variables)
  result = single.run(
      search, hparams, state, train=task.train, val=task.val, wall=wall,
      directory=os.path.join(task.directory, "search"), batch_size=task.batch_size,
      total_steps=plan["total"], seed=task.seed, eval_batch_size=task.eval_batch_size,
      fp32_top1=task.fp32_val_top1, log_every=max(1, min(100, plan["total"])),
      progress=task.progress, tensorboard=False)
  last = result.epochs[-1]
  return result.policy, {
      "search_val_top1": last["val_top1"], "search_steps": plan["total"],
      "argmax_cost_ratio": last["argmax_cost_ratio"], "enforced": last["enforced"],
      "records": result.epochs, "trace_counts": result.trace_counts}


def run_rl(task: Task, *, episodes: int, episode_steps: int, episode_lr: float,
           ddpg: DDPGConfig | None) -> tuple[Policy, dict[str, Any]]:
  """HAQ's DDPG search, episodes scored by a short QAT (`haqjax.jobs.rl`'s search step)."""
  if ddpg is None:  # HAQ's 20 warm-up episodes, or a fifth of a short search.
    ddpg = DDPGConfig(warmup_episodes=min(20, max(1, episodes // 5)))
  available = haq_data.num_batches(task.train, task.batch_size, drop_remainder=True)
  if episode_steps > available:
    raise ValueError(f"episode_steps={episode_steps} needs {episode_steps} batches of "
                     f"{task.batch_size}; the training data has {available}")
  scorer = scoring.QATScorer(
      task.model, task.variables, task.train, task.val, num_steps=episode_steps,
      batch_size=task.batch_size, learning_rate=episode_lr, momentum=task.momentum,
      weight_decay=task.weight_decay, eval_batch_size=task.eval_batch_size,
      seed=task.seed, calibration_batches=task.calibration_batches,
      model_name=type(task.model).__name__)
  problem = rl_search.Problem(
      names=task.table.names, observations=env_lib.observations(task.table, "linear"),
      mode="linear", min_bits=task.wall.min_bits, max_bits=task.wall.max_bits,
      wall=task.wall, fp32_top1=task.fp32_val_top1, episodes=episodes, ddpg=ddpg,
      seed=task.seed)
  result = rl_search.run(problem, scorer, os.path.join(task.directory, "search"),
                         progress=task.progress, tensorboard=False)
  return result.policy, {
      "search_val_top1": result.best["top1"], "best_reward": result.best["reward"],
      "best_episode": result.best["episode"], "episodes": len(result.records),
      "records": result.records, "trace_counts": result.trace_counts}


def run_hawq(task: Task, hawq: HawqConfig) -> tuple[Policy, dict[str, Any]]:
  """Hessian sensitivities and the ILP (`haqjax.jobs.hawq`'s search step).

  A wrapped plain flax model's (linen or NNX) matmuls of two activations
  are measured by their two operands (`haqjax.search.hawq.wrapped`).

  Raises:
    ValueError: too few training batches.
  """
  wall = task.wall
  bits = hawq.bits(wall.min_bits, wall.max_bits)
  batches = list(itertools.islice(haq_data.batches(
      task.train, batch_size=task.batch_size, seed=task.seed, epoch=0, shuffle=True,
      drop_remainder=True), hawq.hawq_batches))
  if len(batches) < hawq.hawq_batches:
    raise ValueError(f"hawq_batches={hawq.hawq_batches} needs {hawq.hawq_batches} "
                     f"batches of {task.batch_size}; the training data has {len(batches)}")
  t0 = time.perf_counter()
  sensitivity = measure.sensitivity_pass(
      jax.random.key(task.seed), task.model, task.calibrated(task.top_policy(max(bits))),
      batches, w_bits=hawq_job.measured_bits(bits, wall.fixed.w),
      a_bits=hawq_job.measured_bits(bits, wall.fixed.a), probes=hawq.hawq_probes,
      tol=hawq.hawq_tolerance, max_iterations=hawq.hawq_max_iterations,
      label_smoothing=task.label_smoothing, curvature=hawq.hawq_curvature,
      granularity=hawq.hawq_granularity)
  problem = HawqProblem.create(
      task.table.names, sensitivity.omega, wall.tensor, wall.limit, w_bits=bits,
      a_bits=bits, fixed_w=wall.fixed.w, fixed_a=wall.fixed.a, label=str(wall.budget))
  policy = hawq_job.allocate(problem, hawq.hawq_allocator, sensitivity)
  omega, _ = problem.evaluate(policy)
  return policy, {
      "omega": omega, "allocator": hawq.hawq_allocator,
      "weight_traces": sensitivity.traces.weight.tolist(),
      "activation_traces": sensitivity.traces.activation.tolist(),
      "sensitivity_seconds": time.perf_counter() - t0,
      "pareto": hawq_job.pareto(problem)}
