r"""Differentiable search benchmark: step costs, search time vs RL, vmapped sweeps.

  python -m experiments.bench search-gumbel [--init_from=FP32_WORKDIR] \
      [--rl_workdir=RL_WORKDIR] [--gumbel_recipes=quickstart_sweep] \
      [--sweep_members=8] [--sweep_steps=40] [--out=bench_search-gumbel.json]

Restores the FP32 quickstart model of `--init_from` (or trains one for 2
epochs in a temporary folder) and measures on this machine:

  * steps (median ms after compilation, with min and max, batch 128;
    `timing.time_call`): the search's mixed step
    (K = 6 candidates per tensor, quickstart_gumbel.flags), the same with
    the other `--gumbel_quantizers` (shared or per candidate), both again on
    LSQ quantizers (a learned step per candidate costs a gradient each), with 3
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
    costs), a vmapped sweep (`haqjax.search.gumbel.sweep`) against the same
    searches one by one (`haqjax.search.gumbel.single`), measured two ways
    and never mixed:
      - steady state: one mixed step against the K-member vmapped step, per
        member, after compilation; the two alternate over
        `--sweep_repeats` rounds (>= 3) and each round's median is a sample;
      - whole runs of `--sweep_steps` steps: the K searches one after
        another (each compiling its own step, as separate launcher runs would;
        here in one process, so without their start-up and data loading)
        against one sweep, order alternated over `--sweep_repeats` repeats,
        JAX's caches cleared before each run so every run compiles afresh;
      - compilation apart: the single and the vmapped step's
        ahead-of-time lower-and-compile seconds.
    Target: sweep <= 0.7 x sequential (whole runs). Both derive the same
    policies (checked). On a CPU the vmapped step does no less work than the
    K single steps (no batching of weights, which differ per member), so what
    a sweep saves there is compilation and per-run overhead, not step time.
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


def _problem(name: str, init_from: str, data_dir: str | None, **overrides: Any) -> _Problem:
  from experiments.bench import search_rl  # pylint: disable=g-import-not-at-top
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  config, search, gumbel = gumbel_recipe(name, data_dir=data_dir, progress=False,
                                         tensorboard=False, init_from=init_from, **overrides)
  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         val_size=config.val_size, split_seed=config.split_seed)
  table = layer_table(trainer.build_model(config.replace(mode="train"),
                                          splits.spec.num_classes),
                      (1, *splits.spec.image_shape))
  wall = stages.build_wall(config, search, table)
  model = trainer.build_model(stages.qat_config(config, search, policy="w8a8"),
                              splits.spec.num_classes)
  fp32_val = search_rl.fp32_val_top1(config, search, splits, init_from)
  return _Problem(config, search, gumbel, splits, table, wall, model, init_from,
                  float(fp32_val),
                  haq_data.num_batches(splits.train, config.batch_size, drop_remainder=True))


def _start(p: _Problem, gumbel=None):
  """`(search, variables)`: the static search and the calibrated FP32 start."""
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  gumbel = gumbel or p.gumbel
  gsearch = gumbel_job.build_search(p.config, gumbel, p.model, p.table.names, p.wall)
  variables = stages.start_variables(p.config, p.model, p.splits, p.fp32_dir,
                                     gsearch.calibration_policies())
  return gsearch, variables


def _time_ms(out: dict[str, Any], key: str, fn, calls: int) -> float:
  """Sets `out[key]` to `fn`'s median ms after compile, its [min, max] in `out["min_max_ms"]`."""
  t = timing.time_call(fn, repeats=calls)
  out[key] = round(t.median_ms, 1)
  out.setdefault("min_max_ms", {})[key] = [round(t.min_ms, 1), round(t.max_ms, 1)]
  return out[key]


def _mixed_step_ms(out: dict[str, Any], p: _Problem, bits: str, sharing: str, key: str,
                   batch) -> float:
  """Times the search's mixed step with `bits` candidates and `sharing` quantizers."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  gumbel = p.gumbel.replace(gumbel_bits=bits, gumbel_quantizers=sharing)
  gsearch, variables = _start(p, gumbel)
  hp = gumbel_job.make_hparams(gumbel, p.wall.limit, p.steps_per_epoch)
  state = gsearch.init(jax.random.PRNGKey(0), hp, variables)
  step = jax.jit(gsearch.train_step)
  return _time_ms(out, key, lambda: step(state, batch, hp)[1]["loss"], 15)


def bench_steps(p: _Problem, lsq: _Problem | None = None) -> dict[str, Any]:
  """Median step times: mixed (6 and 3 candidates), QAT, FP32.

  With `lsq` (the same recipe on LSQ quantizers) also its 6-candidate mixed
  step, a quantizer per candidate and shared: each candidate's learned step
  then has a gradient of its own.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  from haqjax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
  batch = next(haq_data.batches(p.splits.train, batch_size=p.config.batch_size, seed=0,
                                epoch=0, shuffle=True, drop_remainder=True))
  out: dict[str, Any] = {"batch_size": p.config.batch_size}
  shared = "per_candidate" if p.gumbel.gumbel_quantizers == "shared" else "shared"
  k, bits, sharing = len(p.gumbel.bits()), p.gumbel.gumbel_bits, p.gumbel.gumbel_quantizers
  _mixed_step_ms(out, p, bits, sharing, f"mixed_k{k}_ms", batch)
  _mixed_step_ms(out, p, bits, shared, f"mixed_k{k}_{shared}_ms", batch)
  _mixed_step_ms(out, p, "2,4,8", sharing, "mixed_k3_ms", batch)
  if lsq is not None:
    for sharing in ("per_candidate", "shared"):
      _mixed_step_ms(out, lsq, lsq.gumbel.gumbel_bits, sharing,
                     f"lsq_mixed_k{len(lsq.gumbel.bits())}_{sharing}_ms", batch)
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
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.search import scoring  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import single as search_lib  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  wall = stages.build_wall(p.config, p.search.replace(budget=budget), p.table)
  gsearch, variables = _start(p, gumbel)
  hp = gumbel_job.make_hparams(gumbel, wall.limit, p.steps_per_epoch)
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
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  rows = []
  for name in names:
    p = _problem(name, init_from, data_dir)
    plan = gumbel_job.schedule(p.gumbel, p.steps_per_epoch)
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


def _sweep_setup(p: _Problem, members: int):
  """`(budgets, walls, search, variables, stacked hparams, keys)` of the K members."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  budgets = (SWEEP_BUDGETS * members)[:members]
  walls = [stages.build_wall(p.config, p.search.replace(budget=b), p.table)
           for b in budgets]
  gsearch, variables = _start(p)
  hps = sweep_lib.stack([gumbel_job.make_hparams(p.gumbel, w.limit, p.steps_per_epoch)
                         for w in walls])
  # One key for all: each member then does exactly its standalone search's
  # work (the sweep job itself gives members their own keys).
  keys = jax.numpy.stack([jax.random.PRNGKey(p.config.seed)] * members)
  return budgets, walls, gsearch, variables, hps, keys


def bench_vmap(p: _Problem, members: int, rounds: int) -> dict[str, Any]:
  """Steady state and compilation: one mixed step vs the K-member vmapped step."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  _, _, gsearch, variables, hps, keys = _sweep_setup(p, members)
  batch = next(haq_data.batches(p.splits.train, batch_size=p.config.batch_size, seed=0,
                                epoch=0, shuffle=True, drop_remainder=True))
  states = sweep_lib.init(gsearch, keys, hps, variables)
  state, hp = sweep_lib.member(states, 0), sweep_lib.member(hps, 0)
  single = jax.jit(gsearch.train_step)
  vmapped = jax.jit(jax.vmap(gsearch.train_step, in_axes=(0, None, 0)))
  compile_s = {}
  for name, fn, args in (("single", single, (state, batch, hp)),
                         ("vmapped", vmapped, (states, batch, hps))):
    t0 = time.perf_counter()
    fn.lower(*args).compile()
    compile_s[name] = round(time.perf_counter() - t0, 2)
  calls = {"single": lambda: single(state, batch, hp)[1]["loss"],
           "vmapped": lambda: vmapped(states, batch, hps)[1]["loss"]}
  samples: dict[str, list[float]] = {"single": [], "vmapped": []}
  for r in range(rounds):
    for name in (("single", "vmapped") if r % 2 == 0 else ("vmapped", "single")):
      samples[name].append(timing.time_call(calls[name], repeats=5).median)
  single_t = timing.summarize(samples["single"])
  per_member = timing.summarize([s / members for s in samples["vmapped"]])
  return {"members": members, "rounds": rounds,
          "single_step": single_t.to_dict("ms", 1),
          "vmapped_step_per_member": per_member.to_dict("ms", 1),
          "per_member_vs_single": round(per_member.median / single_t.median, 3),
          "compile_seconds": compile_s}


def bench_sweep(p: _Problem, members: int, steps: int, repeats: int, tmp: str
                ) -> dict[str, Any]:
  """(b) whole runs: the K searches one by one against one vmapped sweep."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.search import scoring  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  budgets = (SWEEP_BUDGETS * members)[:members]
  val = scoring.subset(p.splits.val, p.search.search_val_size)

  def sequential(tag):
    jax.clear_caches()
    t0, policies = time.perf_counter(), []
    for i, b in enumerate(budgets):
      _, result = _run_search(p, p.gumbel, steps, os.path.join(tmp, f"{tag}_seq{i}"), b)
      policies.append(result.policy.to_dict())
    return time.perf_counter() - t0, policies

  def sweep(tag):
    jax.clear_caches()
    t0 = time.perf_counter()
    _, walls, gsearch, variables, hps, keys = _sweep_setup(p, members)
    result = sweep_lib.run(
        gsearch, hps, sweep_lib.init(gsearch, keys, hps, variables),
        train=p.splits.train, val=val, walls=walls,
        directory=os.path.join(tmp, f"{tag}_sweep"), batch_size=p.config.batch_size,
        total_steps=steps, seed=p.config.seed, eval_batch_size=p.config.eval_batch_size,
        fp32_top1=p.fp32_val, log_every=p.config.log_every_steps, tensorboard=False)
    return time.perf_counter() - t0, [q.to_dict() for q in result.policies], result

  seq_s, sweep_s, same, order = [], [], True, []
  for r in range(repeats):
    first = "sequential" if r % 2 == 0 else "sweep"
    order.append(first)
    for which in ((first, "sweep" if first == "sequential" else "sequential")):
      if which == "sequential":
        seconds, seq_policies = sequential(f"r{r}")
        seq_s.append(seconds)
      else:
        seconds, sweep_policies, result = sweep(f"r{r}")
        sweep_s.append(seconds)
    same = same and seq_policies == sweep_policies
  seq_t, sweep_t = timing.summarize(seq_s), timing.summarize(sweep_s)
  ratio = sweep_t.median / seq_t.median
  return {"members": members, "steps": steps, "budgets": list(budgets),
          "repeats": repeats, "first_of_each_repeat": order,
          "sequential": seq_t.to_dict("s", 1), "sweep": sweep_t.to_dict("s", 1),
          "ratio": round(ratio, 3),
          "target": f"sweep <= {TARGET_SWEEP_RATIO} x sequential (medians)",
          "met": bool(ratio <= TARGET_SWEEP_RATIO), "same_policies": bool(same),
          "trace_counts": result.trace_counts}


def _range(t: dict[str, Any], unit: str) -> str:
  return (f"{t[f'median_{unit}']:.1f} {unit} (min {t[f'min_{unit}']:.1f}, "
          f"max {t[f'max_{unit}']:.1f}, n={t['repeats']})")


def _print(result: dict[str, Any]) -> None:
  s = result["steps"]
  print(f"Steps (median ms, batch {s['batch_size']}, after compile):")
  for key, what in (("fp32_ms", "FP32 step"), ("qat_w4a4_ms", "QAT W4A4 step"),
                    ("mixed_k3_ms", "mixed step, 3 candidates"),
                    ("mixed_k6_ms", "mixed step, 6 candidates (recipe)"),
                    ("mixed_k6_shared_ms", "the same, quantizers shared"),
                    ("mixed_k6_per_candidate_ms", "the same, a quantizer per candidate"),
                    ("lsq_mixed_k6_per_candidate_ms", "LSQ, a quantizer per candidate"),
                    ("lsq_mixed_k6_shared_ms", "LSQ, quantizers shared")):
    if key in s:
      print(f"  {what:<40}{s[key]:>9.1f}")
  print(f"(a) search at the W4A4 budget vs RL ({result['rl']['seconds']:.0f} s, "
        f"{result['rl']['source']}); target <= {TARGET_RL_FRACTION:.0%} of RL:")
  print(f"  {'recipe':<42}{'steps':>6}{'seconds':>9}{'x RL':>7}  met")
  for r in result["recipes"]:
    mark = "" if r["measured"] else " (projected)"
    print(f"  {r['recipe']:<42}{r['steps']:>6}{r['seconds']:>9.1f}"
          f"{r['fraction_of_rl']:>7.3f}  {'yes' if r['met'] else 'NO'}{mark}")
  v = result["vmap"]
  k = v["members"]
  print(f"(b) steady state, {v['rounds']} alternating rounds: one mixed step "
        f"{_range(v['single_step'], 'ms')}; vmapped x{k}, per member "
        f"{_range(v['vmapped_step_per_member'], 'ms')} = {v['per_member_vs_single']:.2f}x "
        f"one step ({'vmap loses' if v['per_member_vs_single'] > 1 else 'vmap wins'} "
        f"per step on {result['backend']})")
  print(f"    compilation (lower + compile): one step {v['compile_seconds']['single']} s, "
        f"vmapped x{k} {v['compile_seconds']['vmapped']} s")
  w = result["sweep"]
  print(f"    whole runs, {w['members']} searches x {w['steps']} steps, {w['repeats']} "
        f"repeats (order alternated, caches cleared): one by one "
        f"{_range(w['sequential'], 's')}; vmapped sweep {_range(w['sweep'], 's')} = "
        f"{w['ratio']:.2f}x (target <= {TARGET_SWEEP_RATIO}: "
        f"{'met' if w['met'] else 'NOT met'}); same policies: {w['same_policies']}",
        flush=True)


def run(init_from: str | None = None, data_dir: str | None = None,
        rl_workdir: str | None = None, recipes_: tuple[str, ...] = ("quickstart_sweep",),
        members: int = 8, sweep_steps: int = 40, max_search_seconds: float = 240.0,
        sweep_repeats: int = 3) -> dict[str, Any]:
  """Runs the benchmark; prints a summary and returns a JSON-able dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  if members < 2 or sweep_steps < 1 or sweep_repeats < timing.MIN_REPEATS:
    raise ValueError(f"sweep_members={members}, sweep_steps={sweep_steps}, "
                     f"sweep_repeats={sweep_repeats}; allowed: members >= 2, steps >= 1, "
                     f"repeats >= {timing.MIN_REPEATS}")
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
    steps = bench_steps(p, _problem("quickstart_gumbel", init_from, data_dir,
                                    weight_quantizer="lsq", act_quantizer="lsq"))
    print(f"steps: {steps}", flush=True)
    rows = bench_recipes(recipes_, init_from, data_dir, rl["seconds"],
                         steps["mixed_k6_ms"], max_search_seconds, tmp)
    sweep_problem = _problem(recipes_[0], init_from, data_dir)
    vmap = bench_vmap(sweep_problem, members, rounds=sweep_repeats)
    print(f"vmap: {vmap}", flush=True)
    sweep = bench_sweep(sweep_problem, members, sweep_steps, sweep_repeats, tmp)
  result = {"jax": jax.__version__, "backend": jax.default_backend(),
            "model": p.config.model, "dataset": p.config.dataset,
            "target": p.search.target, "budget": str(p.search.budget_spec()),
            "rl": rl, "steps": steps, "recipes": rows, "vmap": vmap, "sweep": sweep}
  _print(result)
  return result
