"""Scoring a bit policy during a search: accuracy on a held-out split.

`QATScorer` is HAQ's signal: start from the FP32 weights, fine-tune for a
few steps under the policy, and measure top-1 on the validation split carved
from train (never the test split, and not the training accuracy the
original code used). The fine-tune and eval steps take the policy as data,
so they are traced and compiled once for the whole search (`trace_counts()` counts
them). `PTQScorer` (from `haqjax.ptq`) is the faster, training-free signal.

Every episode sees the same fine-tuning batches, so rewards differ only
through the policies.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp

from haqjax import data as haq_data
from haqjax import parallel
from haqjax.nn import calibrate as calibrate_lib
from haqjax.policy import Policy
from haqjax.train import steps
from haqjax.train.trainer import Evaluator
from haqjax.train.trainer import merge_variables
from haqjax.typing import PyTree

SCORERS = ("qat", "ptq")
# HAQ's reward: 0.1 * (top-1 - FP32 top-1), top-1 in percent points; both
# searches report it, so their records compare.
REWARD_SCALE = 0.1


def reward(top1: float, fp32_top1: float) -> float:
  """HAQ's reward of a policy scoring `top1` against the FP32 model's `fp32_top1`."""
  return REWARD_SCALE * (float(top1) - float(fp32_top1))


def has_quant_params(params: PyTree) -> bool:
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return any(getattr(p, "key", None) in ("weight_quant", "act_quant")
             for path, _ in paths for p in path)


def subset(split: haq_data.Split, size: int) -> haq_data.Split:
  """The first `size` examples of `split` (all of them when `size` is 0)."""
  if not size or size >= len(split):
    return split
  return dataclasses.replace(split, rows=split.rows[:size])


class QATScorer:
  """Top-1 of a policy after a short QAT fine-tune from the FP32 weights.

  Example::

      scorer = QATScorer(qat_model, fp32_variables, splits.train, splits.val,
                         num_steps=40, batch_size=128, learning_rate=0.01)
      top1 = scorer(policy)["top1"]
  """

  def __init__(self, model, variables: PyTree, train: haq_data.Split,
               val: haq_data.Split, *, num_steps: int, batch_size: int,
               learning_rate: float, momentum: float = 0.9, weight_decay: float = 0.0,
               eval_batch_size: int = 500, seed: int = 0, calibration_batches: int = 4,
               model_name: str = "model"):
    if num_steps < 0:
      raise ValueError(f"search_finetune_steps={num_steps}; allowed: >= 0")
    mesh = parallel.data_mesh()
    parallel.check_batch_size("batch_size", batch_size, mesh)
    self._sharding = parallel.batch_sharding(mesh)
    self.model = model
    self.val = val
    self._train_traces = 0
    tx = episode_optimizer(learning_rate, momentum, weight_decay)
    input_shape = (1, *train.spec.image_shape)
    state = steps.init_state(jax.random.PRNGKey(seed), model, tx, input_shape)
    state = merge_variables(state, variables, tx, source="the FP32 model",
                            model=model_name)
    self._tx = tx
    self._mesh = mesh
    self._needs_calibration = has_quant_params(state.params)
    self._initial = parallel.replicate(state, mesh)
    available = haq_data.num_batches(train, batch_size, drop_remainder=True)
    if num_steps > available:
      raise ValueError(f"search_finetune_steps={num_steps} needs {num_steps} batches of "
                       f"{batch_size}; the training split has {available}")
    self._batches = list(itertools.islice(haq_data.batches(
        train, batch_size=batch_size, seed=seed, epoch=0, shuffle=True,
        drop_remainder=True, sharding=self._sharding), num_steps))
    self._calibration = self._batches[:calibration_batches] or list(itertools.islice(
        haq_data.batches(train, batch_size=batch_size, seed=seed, epoch=0,
                         shuffle=True, drop_remainder=True), calibration_batches))

    def train_step(state, batch, policy):
      self._train_traces += 1
      return steps.train_step(model, tx, state, batch, policy)

    self._train = jax.jit(train_step, donate_argnums=0)
    self._evaluate = Evaluator(model, self._sharding, eval_batch_size)

  def trace_counts(self) -> dict[str, int]:
    """How often the compiled steps were traced (1 each, any policies).

    The fine-tune and eval steps, and, for quantizers with parameters (LSQ,
    PACT, k-means, static ranges), the calibration's recording and fit
    (`calibration_record`, `calibration_calibrate`; shared by equal models).
    """
    counts = {"train": self._train_traces, "eval": self._evaluate.traces}
    if self._needs_calibration:
      counts.update({f"calibration_{k}": v for k, v in
                     calibrate_lib.calibrator(self.model).trace_counts().items()})
    return counts

  def __call__(self, policy: Policy) -> dict[str, float]:
    """`{"top1", "top5", "loss", "seconds"}` of `policy` on the held-out split."""
    return self.scores(policy, (len(self._batches),))[len(self._batches)]

  def scores(self, policy: Policy, at_steps) -> dict[int, dict[str, float]]:
    """The held-out metrics of one fine-tune of `policy`, measured after each
    step count of `at_steps` (each in 0..num_steps; `seconds` counts from the
    start): how the reward would read with a shorter fine-tune."""
    at_steps = sorted(set(int(k) for k in at_steps))
    if not at_steps or at_steps[0] < 0 or at_steps[-1] > len(self._batches):
      raise ValueError(f"at_steps={at_steps}; allowed: 0..{len(self._batches)} "
                       "(the scorer's fine-tune steps)")
    t0 = time.perf_counter()
    state = jax.tree.map(jnp.copy, self._initial)  # The step donates its input.
    if self._needs_calibration:
      variables = calibrate_lib.calibrate(
          self.model, state.variables(), [jax.device_get(b) for b in self._calibration],
          policy)
      state = state.replace(params=variables["params"],
                            opt_state=self._tx.init(variables["params"]))
      # Placed as the train step's outputs are, so that it traces once.
      state = parallel.replicate(state, self._mesh)
    out = {}
    for step in range(at_steps[-1] + 1):
      if step in at_steps:
        metrics = self._evaluate(state.variables(), self.val, policy)
        metrics.pop("count", None)
        out[step] = {**metrics, "seconds": time.perf_counter() - t0}
      if step < at_steps[-1]:
        state, _ = self._train(state, self._batches[step], policy)
    return out


def episode_optimizer(learning_rate: float, momentum: float, weight_decay: float):
  """The episode fine-tune's optimizer: SGD (Nesterov) at a constant rate."""
  return steps.make_optimizer(name="sgd", learning_rate=learning_rate,
                              momentum=momentum, weight_decay=weight_decay)
