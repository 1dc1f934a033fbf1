"""`search_policy`: a mixed-precision policy for the user's model in one call.

::

    result = haqjax.search_policy(model, variables, (x_train, y_train), (x_val, y_val),
                                  test=(x_test, y_test), target="bismo-edge",
                                  metric="latency", budget="w4a4", method="gumbel")
    result.policy, result.cost, result.test_top1
    print(result.report())          # markdown; result.write(DIR) writes it out

The stages of the search jobs (`haqjax.jobs`), on the user's model and data
instead of a config and a dataset name: the model made quantizable
(`haqjax.api.training.quantize`), its layer table, costs and budget wall on
the chosen hardware target (`haqjax.hardware`, `haqjax.search.env`), the
FP32 model scored on the held-out data, the search (`haqjax.api.methods`),
a QAT fine-tune of the found policy from the user's weights, its top-1 on
the held-out and test data (fake-quant, and the integer engine's where
`haqjax.deploy` can lower the model), and the uniform policies asked for
fine-tuned and tested with the same recipe beside it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from haqjax import data as haq_data
from haqjax import hardware
from haqjax.api import methods
from haqjax.api import training
from haqjax.api.result import SearchResult
from haqjax.hardware.budget import reference_bits
from haqjax.nn.table import layer_table
from haqjax.policy import Policy
from haqjax.quant import QuantScheme
from haqjax.search import env as env_lib
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.search.hawq.config import HawqConfig
from haqjax.search.rl.config import DDPGConfig
from haqjax.typing import PyTree


def make_budget(budget: float | str | hardware.Budget, metric: str) -> hardware.Budget:
  """`budget` as a `hardware.Budget` on `metric`.

  A string 'wXaY' is "no more than uniform wXaY" (a ratio of 1.0 of it); a
  number is a ratio of the all-W8A8 network (HAQ's budgets); a `Budget` is
  kept (its own metric).
  """
  if isinstance(budget, hardware.Budget):
    return budget
  if isinstance(budget, str):
    reference_bits(budget)  # Names the allowed forms if it is not one.
    return hardware.Budget(metric=metric, value=1.0, kind="ratio", reference=budget)
  if isinstance(budget, bool) or not isinstance(budget, (int, float, np.floating)):
    raise ValueError(f"budget is {budget!r}; allowed: 'wXaY' (at most uniform wXaY), "
                     "a ratio of W8A8 (e.g. 0.5) or a haqjax.hardware.Budget")
  return hardware.Budget(metric=metric, value=float(budget), kind="ratio",
                         reference="w8a8")


def make_wall(table, target: str, budget: hardware.Budget, *, min_bits: int,
              max_bits: int, first_layer_w8: bool, last_layer_w8a8: bool,
              wall_order: str = "haq") -> env_lib.BudgetWall:
  """Costs, budget and fixed layers of a table (`haqjax.jobs.stages.build_wall`)."""
  hw = hardware.get_target(target)
  layers = hardware.from_layer_table(table, batch=int(getattr(hw, "batch", 1)))
  fixed = env_lib.Fixed.create(len(table), mode="linear", first_layer_w8=first_layer_w8,
                               last_layer_w8a8=last_layer_w8a8)
  return env_lib.BudgetWall(hw, layers, budget, min_bits=min_bits, max_bits=max_bits,
                            fixed=fixed, order=wall_order)


def search_policy(model, variables: PyTree | None, train: Any, val: Any, *,
                  test: Any = None, target: str = "bismo-edge", metric: str = "latency",
                  budget: float | str | hardware.Budget = "w4a4", method: str = "gumbel",
                  min_bits: int = 2, max_bits: int = 8, first_layer_w8: bool = False,
                  last_layer_w8a8: bool = False, wall_order: str = "haq",
                  quant_scheme: QuantScheme | None = None,
                  batch_size: int = 128, eval_batch_size: int = 500,
                  finetune_epochs: float = 1.0, finetune_learning_rate: float = 0.01,
                  uniform: Sequence[str] = (), search_epochs: float | None = None,
                  episodes: int = 40, episode_steps: int = 20, episode_lr: float = 0.01,
                  gumbel: GumbelConfig | None = None, hawq: HawqConfig | None = None,
                  ddpg: DDPGConfig | None = None, momentum: float = 0.9,
                  weight_decay: float = 0.0, calibration_batches: int = 4,
                  workdir: str | None = None, seed: int = 0, progress: bool = False
                  ) -> SearchResult:
  """Searches, fine-tunes and scores a per-layer bit policy under a hardware budget.

  Args:
    model: a plain `flax.linen` model (wrapped by `haqjax.nn.quantized`), a
      model of haqjax layers, called `model.apply(variables, images, ...)`,
      or a flax NNX model (`nnx.Module`, converted by
      `haqjax.nn.nnx_quantized`).
    variables: its trained FP32 variables (`params`, `batch_stats`); for an
      NNX model None (its own state) or `nnx.state(model)`.
    train: training data: `(images, labels)` numpy arrays, an iterable of
      such batches, or a haqjax `Split` (`haqjax.data.as_split`: uint8
      images are scaled to [0, 1], float images used as given).
    val: held-out data that scores the candidate policies (never the test set).
    test: test data for the final figures; None: reported on `val` only.
    target: hardware target (`haqjax.hardware.TARGETS`).
    metric: the budget's metric (`haqjax.hardware.METRICS`), e.g. latency, energy.
    budget: 'wXaY' (no more than uniform wXaY), a ratio of W8A8 (0.5) or a
      `haqjax.hardware.Budget`.
    method: 'gumbel' (differentiable search), 'rl' (HAQ's DDPG agent) or
      'hawq' (Hessian sensitivities and an ILP).
    min_bits, max_bits: the bit range of the search.
    first_layer_w8, last_layer_w8a8: HAQ's fixed first and last layers.
    wall_order: how a policy over the budget (an RL episode's, a Gumbel
      argmax) is lowered into it: 'haq' (HAQ's sweep) or 'saving' (the
      drops that save the most cost per bit first; `haqjax.search.env`).
    quant_scheme: quantizers of a wrapped plain model; default min-max
      weights and static (calibrated) activation ranges.
    batch_size, eval_batch_size: training and evaluation batch sizes.
    finetune_epochs: QAT of the found policy (and of each uniform point)
      from the FP32 weights, in epochs; 0: calibration only.
    finetune_learning_rate: its peak learning rate (cosine schedule).
    uniform: uniform policies ('w4a4', ...) fine-tuned and tested the same
      way, as reference points.
    search_epochs: the Gumbel search's length (default `gumbel`'s, 2 epochs).
    episodes, episode_steps, episode_lr: the RL search's episodes, and the
      QAT steps and learning rate that score each one.
    gumbel, hawq, ddpg: full settings of each family (defaults: the launcher's).
    momentum, weight_decay: the SGD recipe of every fine-tune.
    calibration_batches: batches that calibrate static quantizers per policy.
    workdir: where the search writes checkpoints and records (a rerun with
      the same workdir resumes the search); default a temporary folder,
      removed after.
    seed: data order and every key.
    progress: show progress bars.

  Returns:
    A `SearchResult`: the policy, per-layer and total costs, accuracies, the
    uniform points and `report()`. Its `model` is the quantizable linen
    module and `variables` the fine-tuned ones in linen's layout; for an NNX
    model `haqjax.nn.nnx_update(model, result.variables)` writes them back.

  Raises:
    ValueError: for a bad argument (naming it and what is allowed), data
      that do not fit the model, or a budget no policy in the bit range meets.
  """
  methods.check(None, method)
  t_start = time.perf_counter()
  train, val, test = splits(train, val, test)
  budget = make_budget(budget, metric)
  input_shape = (1, *train.spec.image_shape)
  qmodel, qvars = training.quantize(model, variables, input_shape,
                                    quant_scheme=quant_scheme)
  table = layer_table(qmodel, input_shape)
  wall = make_wall(table, target, budget, min_bits=min_bits, max_bits=max_bits,
                   first_layer_w8=first_layer_w8, last_layer_w8a8=last_layer_w8a8,
                   wall_order=wall_order)
  uniform_policies = [uniform_policy(u, table, wall) for u in uniform]
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  fp32 = fp32_scores(qmodel, qvars, val, test, eval_batch_size)
  timings["fp32_eval_seconds"] = time.perf_counter() - t0

  with tempfile.TemporaryDirectory(prefix="haqjax_search_") as scratch:
    task = methods.Task(
        model=qmodel, variables=qvars, train=train, val=val, table=table, wall=wall,
        fp32_val_top1=fp32["val_top1"], directory=os.path.abspath(workdir or scratch),
        batch_size=batch_size, eval_batch_size=eval_batch_size, momentum=momentum,
        weight_decay=weight_decay, calibration_batches=calibration_batches, seed=seed,
        progress=progress)
    t0 = time.perf_counter()
    if method == "gumbel":
      gumbel = gumbel or GumbelConfig()
      if search_epochs is not None:
        gumbel = gumbel.replace(gumbel_epochs=search_epochs)
      policy, info = methods.run_gumbel(task, gumbel)
    elif method == "rl":
      policy, info = methods.run_rl(task, episodes=episodes, episode_steps=episode_steps,
                                    episode_lr=episode_lr, ddpg=ddpg)
    else:
      policy, info = methods.run_hawq(task, hawq or HawqConfig())
    timings["search_seconds"] = time.perf_counter() - t0

  recipe = dict(epochs=finetune_epochs, learning_rate=finetune_learning_rate)
  t0 = time.perf_counter()
  tuned_vars, scores = tune(task, policy, test, **recipe)
  timings["finetune_seconds"] = time.perf_counter() - t0
  integer = training.integer_scores(qmodel, tuned_vars, policy,
                                    test if test is not None else val, eval_batch_size)
  t0 = time.perf_counter()
  points = uniform_points(task, uniform_policies, test, **recipe)
  timings["uniform_seconds"] = time.perf_counter() - t0
  timings["total_seconds"] = time.perf_counter() - t_start
  described = wall.describe(policy.w_bits, policy.a_bits)
  return SearchResult(
      policy=policy, table=table, model=qmodel, variables=tuned_vars, method=method,
      target=target, budget=str(budget), metric=budget.metric,
      unit=hardware.base.UNITS[budget.metric], limit=wall.limit,
      reference=budget.reference, cost=described["cost"], cost_ratio=described["ratio"],
      layer_costs=np.asarray(wall.layer_costs(policy.w_bits, policy.a_bits)),
      fits=wall.fits(policy.w_bits, policy.a_bits), fp32=fp32, quantized=scores,
      integer=integer, uniform=points, search=info, timings=timings)


def splits(train: Any, val: Any, test: Any
           ) -> tuple[haq_data.Split, haq_data.Split, haq_data.Split | None]:
  """The user's data as splits (`haqjax.data.as_split`), val and test with train's classes."""
  train = haq_data.as_split(train, name="train")
  val = haq_data.as_split(val, name="val", num_classes=train.spec.num_classes)
  test = None if test is None else haq_data.as_split(
      test, name="test", num_classes=train.spec.num_classes)
  return train, val, test


def fp32_scores(model, variables: PyTree, val: haq_data.Split,
                test: haq_data.Split | None, eval_batch_size: int) -> dict[str, float]:
  """The FP32 model's `val_top1` (and `test_top1`), percent."""
  scores = {"val_top1": training.evaluate(model, variables, val, None,
                                          batch_size=eval_batch_size)["top1"]}
  if test is not None:
    scores["test_top1"] = training.evaluate(model, variables, test, None,
                                            batch_size=eval_batch_size)["top1"]
  return scores


def tune(task: methods.Task, policy: Policy, test: haq_data.Split | None, *,
         epochs: float, learning_rate: float) -> tuple[PyTree, dict[str, Any]]:
  """`policy` fine-tuned (or, with `epochs` 0, calibrated) from the FP32 weights, scored.

  Returns:
    The variables and their fake-quant `val_top1` (and `test_top1`), percent.
  """
  if epochs > 0:
    v = training.finetune(task.model, task.variables, task.train, policy, epochs=epochs,
                          learning_rate=learning_rate, batch_size=task.batch_size,
                          momentum=task.momentum, weight_decay=task.weight_decay,
                          calibration_batches=task.calibration_batches, seed=task.seed)
  else:
    v = task.calibrated(policy)
  scores = {}
  for name, split in (("val_top1", task.val), ("test_top1", test)):
    if split is not None:
      scores[name] = training.evaluate(task.model, v, split, policy,
                                       batch_size=task.eval_batch_size,
                                       integer=False)["top1"]
  return v, scores


def uniform_points(task: methods.Task, policies: Sequence[tuple[str, Policy]],
                   test: haq_data.Split | None, *, epochs: float,
                   learning_rate: float) -> list[dict[str, Any]]:
  """Per `(label, policy)`: its bits, cost and top-1 after `tune`."""
  return [{"label": label, "w_bits": np.asarray(p.w_bits).tolist(),
           "a_bits": np.asarray(p.a_bits).tolist(),
           "cost": task.wall.cost(p.w_bits, p.a_bits),
           **tune(task, p, test, epochs=epochs, learning_rate=learning_rate)[1]}
          for label, p in policies]


def uniform_policy(label: str, table, wall: env_lib.BudgetWall) -> tuple[str, Policy]:
  """`('wXaY', policy)` with the wall's fixed layers applied (as the jobs' reference)."""
  w, a = reference_bits(label)
  if w > 8 or a > 8:
    raise ValueError(f"uniform has {label!r}; allowed: 'wXaY' with X, Y in 1..8")
  n = len(table)
  return label, Policy.create(table.names, *wall.fixed.apply(np.full(n, w), np.full(n, a)))
