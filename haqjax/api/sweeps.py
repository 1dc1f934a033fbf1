"""`sweep`: K differentiable bit searches on the user's model as one vmapped job.

::

    result = haqjax.sweep(model, variables, (x_train, y_train), (x_val, y_val),
                          test=(x_test, y_test), target="bismo-edge", metric="latency",
                          budgets=(0.4, 0.6, "w4a4"), axes={"lambda": (0.1, 1.0)})
    result.policies, result.costs, result.test_top1
    print(result.report())

What `haqjax.jobs.sweep` runs, on the user's model and data instead of a
config and a dataset name, with the stages of `haqjax.search_policy`: the
model made quantizable, its layer table and costs on the target, one budget
wall per member, the FP32 model scored on the held-out data; then the K
Gumbel searches train as one jit-compiled, vmapped step
(`haqjax.search.gumbel.sweep`: one trace for all members), each member's
argmax policy is brought within its own budget, and each is fine-tuned from
the user's weights and scored with `search_policy`'s recipe, one after
another, with the uniform points asked for beside them.

Members are the budgets crossed with the other swept axes (`AXES`, the
settings of `GumbelConfig` they name, and 'seed'): their cartesian product,
budgets varying slowest, or with `combine='zip'` position by position. All
members share the data order and calibration (`seed`). Member k's search
key is `fold_in(PRNGKey(seed), k)`, so no two members share Gumbel noise;
with a 'seed' axis it is `PRNGKey(its seed)`, the key of
`haqjax.search_policy(..., method="gumbel", seed=that seed)`, whose policy
member k's then equals when `seed` is that seed too.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from haqjax import hardware
from haqjax.api import methods
from haqjax.api import search as search_api
from haqjax.api import training
from haqjax.api.sweep_result import SweepResult
from haqjax.jobs import gumbel as gumbel_job
from haqjax.jobs import sweep as sweep_job
from haqjax.nn.table import layer_table
from haqjax.quant import QuantScheme
from haqjax.search.gumbel import sweep as sweep_lib
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.typing import PyTree

# The swept axes besides `budgets` (`haqjax.search.gumbel.sweep.AXES`).
AXES = tuple(a for a in sweep_lib.AXES if a != "budget")


def members(budgets: Sequence[Any], axes: Mapping[str, Sequence[float]] | None,
            combine: str) -> list[dict[str, Any]]:
  """One `{'budget': b, axis: value, ...}` per member, in sweep order.

  Raises:
    ValueError: an empty `budgets`, an unknown axis, values that are not
      numbers, a bad `combine`, or too many members.
  """
  if isinstance(budgets, (str, hardware.Budget)) or not isinstance(budgets, Sequence) \
      or not budgets:
    raise ValueError(f"budgets is {budgets!r}; allowed: a non-empty sequence of budgets "
                     "('wXaY', a ratio of W8A8 or a haqjax.hardware.Budget)")
  if combine not in sweep_lib.COMBINES:
    raise ValueError(f"combine is {combine!r}; allowed: {', '.join(sweep_lib.COMBINES)}")
  columns = [("budget", tuple(budgets))]
  for name, values in (axes or {}).items():
    if name not in AXES:
      raise ValueError(f"axes has {name!r}; allowed: {', '.join(AXES)} (budgets are "
                       "given by budgets=)")
    if isinstance(values, str) or not isinstance(values, Sequence) or not values or any(
        isinstance(v, bool) or not isinstance(v, (int, float, np.number)) for v in values):
      raise ValueError(f"axes[{name!r}] is {values!r}; allowed: a non-empty sequence of "
                       "numbers")
    if name == "seed" and any(v != int(v) or v < 0 for v in values):
      raise ValueError(f"axes['seed'] is {values!r}; allowed: non-negative integers")
    columns.append((name, tuple(float(v) for v in values)))
  if combine == "product":
    rows = list(itertools.product(*(v for _, v in columns)))
  else:
    lengths = {len(v) for _, v in columns if len(v) > 1}
    if len(lengths) > 1:
      raise ValueError("combine is 'zip' with lengths " + ", ".join(
          f"{n}: {len(v)}" for n, v in columns) + "; allowed: one length (or 1)")
    k = max(len(v) for _, v in columns)
    rows = list(zip(*(v * k if len(v) == 1 else v for _, v in columns)))
  if len(rows) > sweep_lib.MAX_MEMBERS:
    raise ValueError(f"the sweep has {len(rows)} members; allowed: at most "
                     f"{sweep_lib.MAX_MEMBERS}")
  return [dict(zip((n for n, _ in columns), row)) for row in rows]


def label(values: dict[str, Any]) -> str:
  """'budget=w4a4,lambda=0.1'."""
  return ",".join(f"{a}={v:g}" if isinstance(v, float) else f"{a}={v}"
                  for a, v in values.items())


def sweep(model, variables: PyTree | None, train: Any, val: Any, *,
          test: Any = None, target: str = "bismo-edge", metric: str = "latency",
          budgets: Sequence[float | str | hardware.Budget] = ("w4a4",),
          axes: Mapping[str, Sequence[float]] | None = None, combine: str = "product",
          min_bits: int = 2, max_bits: int = 8, first_layer_w8: bool = False,
          last_layer_w8a8: bool = False, quant_scheme: QuantScheme | None = None,
          batch_size: int = 128, eval_batch_size: int = 500,
          finetune_epochs: float = 1.0, finetune_learning_rate: float = 0.01,
          uniform: Sequence[str] = (), search_epochs: float | None = None,
          gumbel: GumbelConfig | None = None, momentum: float = 0.9,
          weight_decay: float = 0.0, calibration_batches: int = 4,
          workdir: str | None = None, seed: int = 0, progress: bool = False
          ) -> SweepResult:
  """Searches K policies at once (one vmapped Gumbel search), fine-tunes and scores each.

  Args:
    model: the user's model, as `haqjax.search_policy` takes it (plain
      `flax.linen`, haqjax layers, or flax NNX).
    variables: its trained FP32 variables (None or its state for NNX).
    train, val, test: the data, as `search_policy` takes them.
    target: hardware target (`haqjax.hardware.TARGETS`).
    metric: the budgets' metric (`haqjax.hardware.METRICS`); all members
      share it (and so one cost table).
    budgets: one budget per value of the budget axis: 'wXaY', a ratio of
      W8A8 (0.5) or a `haqjax.hardware.Budget` on `metric`.
    axes: other swept values, `{axis: (v1, v2, ...)}`, axis in `AXES`
      ('lambda', 'seed', 'tau0', 'arch_lr', ...: the `GumbelConfig` field
      `haqjax.search.gumbel.sweep.AXES` names, or the member's search key).
    combine: 'product' (every combination, budgets slowest) or 'zip'
      (position by position; an axis of one value broadcasts).
    min_bits, max_bits, first_layer_w8, last_layer_w8a8, quant_scheme,
    batch_size, eval_batch_size, finetune_epochs, finetune_learning_rate,
    uniform, search_epochs, gumbel, momentum, weight_decay,
    calibration_batches, seed, progress: as `haqjax.search_policy`'s;
      `gumbel` is the base search every member starts from.
    workdir: where the stacked search writes its checkpoints and records (a
      rerun with the same workdir resumes it); default a temporary folder.

  Returns:
    A `SweepResult`: per member its policy, cost, budget, accuracies and
    fine-tuned variables, the uniform points and `report()`.

  Raises:
    ValueError: for a bad argument (naming it and what is allowed), a member
      whose settings or budget cannot be met (naming the member), or data
      that do not fit the model.
  """
  t_start = time.perf_counter()
  values = members(budgets, axes, combine)
  base = gumbel or GumbelConfig()
  if search_epochs is not None:
    base = base.replace(gumbel_epochs=search_epochs)
  configs = []
  for v in values:
    changes = {sweep_lib.AXES[a]: x for a, x in v.items() if a not in ("budget", "seed")}
    try:
      configs.append(base.replace(**changes))
    except ValueError as e:
      raise ValueError(f"sweep member {label(v)}: {e}") from None
  parsed = []
  for i, b in enumerate(budgets):
    try:
      parsed.append(search_api.make_budget(b, metric))
    except ValueError as e:
      raise ValueError(f"budgets[{i}]: {e}") from None
    if parsed[-1].metric != metric:
      raise ValueError(f"budgets[{i}] is on {parsed[-1].metric}; allowed: budgets on "
                       f"metric={metric!r} (the members share one cost table)")
  train, val, test = search_api.splits(train, val, test)
  input_shape = (1, *train.spec.image_shape)
  qmodel, qvars = training.quantize(model, variables, input_shape,
                                    quant_scheme=quant_scheme)
  table = layer_table(qmodel, input_shape)
  walls, member_budgets = [], []
  for v in values:
    b = parsed[next(i for i, x in enumerate(budgets) if x is v["budget"])]
    try:
      walls.append(search_api.make_wall(
          table, target, b, min_bits=min_bits, max_bits=max_bits,
          first_layer_w8=first_layer_w8, last_layer_w8a8=last_layer_w8a8))
    except ValueError as e:
      raise ValueError(f"sweep member {label(v)}: {e}") from None
    member_budgets.append(b)
  uniform_policies = [search_api.uniform_policy(u, table, walls[0]) for u in uniform]
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  fp32 = search_api.fp32_scores(qmodel, qvars, val, test, eval_batch_size)
  timings["fp32_eval_seconds"] = time.perf_counter() - t0

  with tempfile.TemporaryDirectory(prefix="haqjax_sweep_") as scratch:
    task = methods.Task(
        model=qmodel, variables=qvars, train=train, val=val, table=table, wall=walls[0],
        fp32_val_top1=fp32["val_top1"], directory=os.path.abspath(workdir or scratch),
        batch_size=batch_size, eval_batch_size=eval_batch_size, momentum=momentum,
        weight_decay=weight_decay, calibration_batches=calibration_batches, seed=seed,
        progress=progress)
    t0 = time.perf_counter()
    gsearch, per_epoch, start = methods.gumbel_setup(task, base)
    hparams = sweep_lib.stack([gumbel_job.make_hparams(g, w.limit, per_epoch)
                               for g, w in zip(configs, walls)])
    total = gumbel_job.schedule(base, per_epoch)["total"]
    state = sweep_lib.init(gsearch, sweep_job.member_keys(seed, values), hparams, start)
    found = sweep_lib.run(
        gsearch, hparams, state, train=train, val=val, walls=walls,
        directory=os.path.join(task.directory, "search"), batch_size=batch_size,
        total_steps=total, seed=seed, eval_batch_size=eval_batch_size,
        fp32_top1=fp32["val_top1"], log_every=max(1, min(100, total)),
        progress=progress, tensorboard=False)
    timings["search_seconds"] = time.perf_counter() - t0

  recipe = dict(epochs=finetune_epochs, learning_rate=finetune_learning_rate)
  rows, tuned = [], []
  t0 = time.perf_counter()
  for i, (v, b, w, p) in enumerate(zip(values, member_budgets, walls, found.policies)):
    last = found.epochs[i][-1]
    member_vars, scores = search_api.tune(task, p, test, **recipe)
    tuned.append(member_vars)
    described = w.describe(p.w_bits, p.a_bits)
    rows.append({
        "member": i, "label": label(v), "values": {a: x for a, x in v.items()
                                                   if a != "budget"},
        "budget": str(b), "reference": b.reference, "limit": w.limit,
        "cost": described["cost"], "cost_ratio": described["ratio"],
        "fits": w.fits(p.w_bits, p.a_bits), "search_val_top1": last["val_top1"],
        "argmax_cost_ratio": last["argmax_cost_ratio"], "enforced": last["enforced"],
        "w_bits": [int(x) for x in p.w_bits], "a_bits": [int(x) for x in p.a_bits],
        **scores})
  timings["finetune_seconds"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  points = search_api.uniform_points(task, uniform_policies, test, **recipe)
  timings["uniform_seconds"] = time.perf_counter() - t0
  timings["total_seconds"] = time.perf_counter() - t_start
  return SweepResult(
      policies=found.policies, members=rows, table=table, model=qmodel, variables=tuned,
      target=target, metric=metric, unit=hardware.base.UNITS[metric], fp32=fp32,
      uniform=points, search={"steps": total, "records": found.epochs,
                              "trace_counts": found.trace_counts},
      timings=timings)
