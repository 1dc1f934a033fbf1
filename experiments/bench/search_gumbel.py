r"""Differentiable search benchmark: step costs, search time vs RL, vmapped sweeps.

  python -m experiments.bench search-gumbel [--init_from=FP32_WORKDIR] \
      [--rl_workdir=RL_WORKDIR] [--gumbel_recipes=quickstart_sweep] \
      [--sweep_members=8] [--sweep_steps=40] [--out=bench_search-gumbel.json]

Restores the FP32 quickstart model of `--init_from` (or trains one for 2
epochs in a temporary folder) and measures on this machine:

  * steps (median ms after compilation, with min and max, batch 128;
    `timing.time_call`): the search's mixed step
    (K = 6 candidates per tensor, quickstart_gumbel.flags), the same with 3
    candidates, a plain W4A4 QAT step, an FP32 step, and the K-member
    vmapped mixed step (per member);
  * (a) each recipe of `--gumbel_recipes` (default quickstart_sweep, the
    tuned one), its search stage end to end as the launcher runs it
    (calibration, compilation, steps, epoch-end scoring and checkpoints),
    against the RL search at the same budget: `--rl_workdir`'s measured
    `search_seconds`, else `bench search-rl`'s projection of the 120-episode
    search. Target: <= 1/5 of the RL time. A recipe's search is projected
    instead of run when its steps would take over --max_search_seconds;
  * (b) `--sweep_members` searches (budget ratios spread over W2A2..W6A6
    costs) for `--sweep_steps` steps: one vmapped sweep
    (`haqjax.search.gumbel.sweep.run`) against the same searches run one
    after another (`search.run`, each compiling its own step, as separate
    launcher runs would; here in one process, so without their start-up and
    data loading). Target: sweep <= 0.7 x sequential. Both derive the same
    policies (checked).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from typing import Any

from experiments.bench import timing

TARGET_RL_FRACTION = 0.2
TARGET_SWEEP_RATIO = 0.7
# Budget ratios (x W4A4 latency) from about W2A2's cost to W6A6's.
SWEEP_BUDGETS = (0.7, 0.83, 0.92, 1.0, 1.12, 1.233, 1.38, 1.523)


def gumbel_recipe(name: str, **overrides: Any):
  """`(Config, SearchConfig, GumbelConfig)` of a `gumbel` recipe."""
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel.config import GumbelConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  return recipes.read_configs(name, (Config, SearchConfig, GumbelConfig), **overrides)


@dataclasses.dataclass
class _Problem:
  config: Any
  search: Any
  gumbel: Any
  splits: Any
  table: Any
  wall: Any
  model: Any
  fp32_dir: str
  fp32_val: float
  steps_per_epoch: int


def _problem(name: str, init_from: str, data_dir: str | None) -> _Problem:
  from experiments.bench import search_rl  # pylint: disable=g-import-not-at-top
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.search import runner  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  config, search, gumbel = gumbel_recipe(name, data_dir=data_dir, progress=False,
                                         tensorboard=False, init_from=init_from)
  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         val_size=config.val_size, split_seed=config.split_seed)
  table = layer_table(trainer.build_model(config.replace(mode="train"),
                                          splits.spec.num_classes),
                      (1, *splits.spec.image_shape))
  wall = runner.build_wall(config, search, table)
  model = trainer.build_model(runner._search_config(config, search, policy="w8a8"),  # pylint: disable=protected-access
                              splits.spec.num_classes)
  fp32_val = search_rl.fp32_val_top1(config, search, splits, init_from)
  return _Problem(config, search, gumbel, splits, table, wall, model, init_from,
                  float(fp32_val),
                  haq_data.num_batches(splits.train, config.batch_size, drop_remainder=True))


def _start(p: _Problem, gumbel=None):
  """`(search, variables)`: the static search and the calibrated FP32 start."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import runner as gumbel_runner  # pylint: disable=g-import-not-at-top
  gumbel = gumbel or p.gumbel
  gsearch = gumbel_runner.build_search(p.config, gumbel, p.model, p.table.names, p.wall)
  top = max(gumbel.bits())
  n = len(p.table)
  policy = Policy.create(p.table.names, *p.wall.fixed.apply(np.full(n, top),
                                                             np.full(n, top)))
  variables = gumbel_runner._start_variables(  # pylint: disable=protected-access
      p.config, p.model, p.splits, p.fp32_dir, policy)
  return gsearch, variables


def _time_ms(out: dict[str, Any], key: str, fn, calls: int) -> float:
  """Sets `out[key]` to `fn`'s median ms after compile, its [min, max] in `out["min_max_ms"]`."""
  t = timing.time_call(fn, repeats=calls)
  out[key] = round(t.median_ms, 1)
  out.setdefault("min_max_ms", {})[key] = [round(t.min_ms, 1), round(t.max_ms, 1)]
  return out[key]


def bench_steps(p: _Problem, members: int) -> dict[str, Any]:
  """Median step times: mixed (6 and 3 candidates), QAT, FP32, vmapped mixed."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import runner as gumbel_runner  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  from haqjax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
  batch = next(haq_data.batches(p.splits.train, batch_size=p.config.batch_size, seed=0,
                                epoch=0, shuffle=True, drop_remainder=True))
  out: dict[str, Any] = {"batch_size": p.config.batch_size}
  for bits in (p.gumbel.gumbel_bits, "2,4,8"):
    gumbel = p.gumbel.replace(gumbel_bits=bits)
    gsearch, variables = _start(p, gumbel)
    hp = gumbel_runner.make_hparams(gumbel, p.wall.limit, p.steps_per_epoch)
    state = gsearch.init(jax.random.PRNGKey(0), hp, variables)
    step = jax.jit(gsearch.train_step)
    _time_ms(out, f"mixed_k{len(gumbel.bits())}_ms",
             lambda: step(state, batch, hp)[1]["loss"], 15)
  gsearch, variables = _start(p)
  hps = sweep_lib.stack([gumbel_runner.make_hparams(p.gumbel, b * p.wall.reference,
                                                    p.steps_per_epoch)
                         for b in (SWEEP_BUDGETS * members)[:members]])
  states = sweep_lib.init(gsearch, jax.random.split(jax.random.PRNGKey(0), members),
                          hps, variables)
  vstep = jax.jit(jax.vmap(gsearch.train_step, in_axes=(0, None, 0)))
  vmapped = _time_ms(out, f"vmapped_x{members}_ms",
                     lambda: vstep(states, batch, hps)[1]["loss"], 3)
  out["vmapped_per_member_ms"] = round(vmapped / members, 1)
  tx = steps_lib.make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9,
                                weight_decay=5e-4)
  state = steps_lib.init_state(jax.random.key(0), p.model, tx,
                               (1, *p.splits.spec.image_shape))
  n = len(p.table)
  w4a4 = Policy.create(p.table.names, np.full(n, 4), np.full(n, 4))
  step = jax.jit(functools.partial(steps_lib.train_step, p.model, tx))
  _time_ms(out, "qat_w4a4_ms", lambda: step(state, batch, w4a4)[1], 15)
  _time_ms(out, "fp32_ms", lambda: step(state, batch, None)[1], 15)
  return out


def _run_search(p: _Problem, gumbel, total_steps: int, directory: str, budget: float = 1.0
                ) -> tuple[float, Any]:
  """The search stage as the launcher runs it; `(seconds, Result)`."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.search import runner  # pylint: disable=g-import-not-at-top
  from haqjax.search import scoring  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import runner as gumbel_runner  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import single as search_lib  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  wall = runner.build_wall(p.config, p.search.replace(budget=budget), p.table)
  gsearch, variables = _start(p, gumbel)
  hp = gumbel_runner.make_hparams(gumbel, wall.limit, p.steps_per_epoch)
  state = gsearch.init(jax.random.PRNGKey(p.config.seed), hp, variables)
  result = search_lib.run(
      gsearch, hp, state, train=p.splits.train,
      val=scoring.subset(p.splits.val, p.search.search_val_size), wall=wall,
      directory=directory, batch_size=p.config.batch_size, total_steps=total_steps,
      seed=p.config.seed, eval_batch_size=p.config.eval_batch_size, fp32_top1=p.fp32_val,
      log_every=p.config.log_every_steps, tensorboard=False)
  return time.perf_counter() - t0, result


def bench_recipes(names, init_from: str, data_dir: str | None, rl_seconds: float,
                  step_ms: float, max_seconds: float, tmp: str) -> list[dict[str, Any]]:
  """(a): each recipe's search stage, timed (or projected), against RL."""
  from haqjax.search.gumbel import runner as gumbel_runner  # pylint: disable=g-import-not-at-top
  rows = []
  for name in names:
    p = _problem(name, init_from, data_dir)
    plan = gumbel_runner.schedule(p.gumbel, p.steps_per_epoch)
    row = {"recipe": f"experiments/flags/{name}.flags", "steps": plan["total"],
           "epochs": p.gumbel.gumbel_epochs}
    if plan["total"] * step_ms / 1000 > max_seconds:
      row["seconds"] = round(plan["total"] * step_ms / 1000, 1)
      row["measured"] = False
      row["how"] = "projected: steps x the median mixed step (no compile, no scoring)"
    else:
      seconds, result = _run_search(p, p.gumbel, plan["total"], os.path.join(tmp, name))
      last = result.epochs[-1]
      row.update(seconds=round(seconds, 1), measured=True,
                 policy_cost_ratio=round(last["cost_ratio"], 4),
                 search_val_top1=last["val_top1"],
                 w_bits=last["w_bits"], a_bits=last["a_bits"])
    row["fraction_of_rl"] = round(row["seconds"] / rl_seconds, 3)
    row["met"] = bool(row["fraction_of_rl"] <= TARGET_RL_FRACTION)
    rows.append(row)
  return rows


def bench_sweep(p: _Problem, members: int, steps: int, tmp: str) -> dict[str, Any]:
  """(b): one vmapped K-member sweep against the K searches one by one."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.search import runner  # pylint: disable=g-import-not-at-top
  from haqjax.search import scoring  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import runner as gumbel_runner  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  budgets = (SWEEP_BUDGETS * members)[:members]
  sequential, policies = [], []
  for i, b in enumerate(budgets):
    seconds, result = _run_search(p, p.gumbel, steps, os.path.join(tmp, f"seq{i}"), b)
    sequential.append(seconds)
    policies.append(result.policy.to_dict())
  t0 = time.perf_counter()
  walls = [runner.build_wall(p.config, p.search.replace(budget=b), p.table)
           for b in budgets]
  gsearch, variables = _start(p)
  hps = sweep_lib.stack([gumbel_runner.make_hparams(p.gumbel, w.limit, p.steps_per_epoch)
                         for w in walls])
  keys = jax.numpy.stack([jax.random.PRNGKey(p.config.seed)] * members)
  result = sweep_lib.run(
      gsearch, hps, sweep_lib.init(gsearch, keys, hps, variables), train=p.splits.train,
      val=scoring.subset(p.splits.val, p.search.search_val_size), walls=walls,
      directory=os.path.join(tmp, "sweep"), batch_size=p.config.batch_size,
      total_steps=steps, seed=p.config.seed, eval_batch_size=p.config.eval_batch_size,
      fp32_top1=p.fp32_val, log_every=p.config.log_every_steps, tensorboard=False)
  swept = time.perf_counter() - t0
  same = [a.to_dict() == b for a, b in zip(result.policies, policies)]
  return {"members": members, "steps": steps, "budgets": list(budgets),
          "sequential_seconds": round(sum(sequential), 1),
          "sequential_per_run": [round(s, 1) for s in sequential],
          "sweep_seconds": round(swept, 1),
          "ratio": round(swept / sum(sequential), 3),
          "target": f"sweep <= {TARGET_SWEEP_RATIO} x sequential",
          "met": bool(swept <= TARGET_SWEEP_RATIO * sum(sequential)),
          "same_policies": same, "trace_counts": result.trace_counts}


def _print(result: dict[str, Any]) -> None:
  s = result["steps"]
  k = result["sweep"]["members"]
  print(f"Steps (median ms, batch {s['batch_size']}, after compile):")
  for key, what in (("fp32_ms", "FP32 step"), ("qat_w4a4_ms", "QAT W4A4 step"),
                    ("mixed_k3_ms", "mixed step, 3 candidates"),
                    ("mixed_k6_ms", "mixed step, 6 candidates (recipe)"),
                    ("vmapped_per_member_ms", f"vmapped x{k} mixed step, per member")):
    print(f"  {what:<40}{s[key]:>9.1f}")
  print(f"(a) search at the W4A4 budget vs RL ({result['rl']['seconds']:.0f} s, "
        f"{result['rl']['source']}); target <= {TARGET_RL_FRACTION:.0%} of RL:")
  print(f"  {'recipe':<42}{'steps':>6}{'seconds':>9}{'x RL':>7}  met")
  for r in result["recipes"]:
    mark = "" if r["measured"] else " (projected)"
    print(f"  {r['recipe']:<42}{r['steps']:>6}{r['seconds']:>9.1f}"
          f"{r['fraction_of_rl']:>7.3f}  {'yes' if r['met'] else 'NO'}{mark}")
  w = result["sweep"]
  print(f"(b) {w['members']} searches x {w['steps']} steps: sequential "
        f"{w['sequential_seconds']:.1f} s, vmapped sweep {w['sweep_seconds']:.1f} s = "
        f"{w['ratio']:.2f}x (target <= {TARGET_SWEEP_RATIO}: "
        f"{'met' if w['met'] else 'NOT met'}); same policies: {all(w['same_policies'])}",
        flush=True)


def run(init_from: str | None = None, data_dir: str | None = None,
        rl_workdir: str | None = None, recipes_: tuple[str, ...] = ("quickstart_sweep",),
        members: int = 8, sweep_steps: int = 40, max_search_seconds: float = 240.0
        ) -> dict[str, Any]:
  """Runs the benchmark; prints a summary and returns a JSON-able dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  if members < 2 or sweep_steps < 1:
    raise ValueError(f"sweep_members={members}, sweep_steps={sweep_steps}; allowed: "
                     "members >= 2, steps >= 1")
  cli.quiet_libraries()
  with tempfile.TemporaryDirectory() as tmp:
    if not init_from:
      init_from = os.path.join(tmp, "fp32")
      trainer.train_and_evaluate(recipes.load_recipe(
          "quickstart", epochs=2, progress=False, tensorboard=False, data_dir=data_dir),
          init_from)
    if rl_workdir:
      with open(os.path.join(rl_workdir, "results.json")) as f:
        rl = {"seconds": json.load(f)["search_seconds"], "source": rl_workdir}
    else:
      from experiments.bench import search_rl  # pylint: disable=g-import-not-at-top
      projected = search_rl.run(init_from=init_from, data_dir=data_dir)["projection"]
      rl = {"seconds": projected["seconds"], "source": "bench search-rl projection"}
    p = _problem("quickstart_gumbel", init_from, data_dir)
    steps = bench_steps(p, members)
    print(f"steps: {steps}", flush=True)
    rows = bench_recipes(recipes_, init_from, data_dir, rl["seconds"],
                         steps["mixed_k6_ms"], max_search_seconds, tmp)
    sweep = bench_sweep(_problem(recipes_[0], init_from, data_dir), members,
                        sweep_steps, tmp)
  result = {"jax": jax.__version__, "backend": jax.default_backend(),
            "model": p.config.model, "dataset": p.config.dataset,
            "target": p.search.target, "budget": str(p.search.budget_spec()),
            "rl": rl, "steps": steps, "recipes": rows, "sweep": sweep}
  _print(result)
  return result
