"""`search_and_evaluate(config, search, hawq, workdir)`: launcher mode `hawq`.

The shared stages (`haqjax.jobs.stages`) around the Hessian-aware
allocation (`haqjax.search.hawq`) in place of a search; each stage
resumable:

  fp32/             FP32 training (skipped when `config.init_from` names a run)
  sensitivity.json  per-layer Hessian traces (kernels and inputs) on
                    --hawq_batches training batches, the quantization errors
                    at the candidate bits and the table Omega[l, w, a]
  policy.json       the allocation of least Omega within the budget
                    (--hawq_allocator: ilp, greedy or monotone), with its
                    cost, Omega and the Pareto front of the ILP over budgets
  finetune/         QAT of that policy from the FP32 weights, then test
  export/           the fine-tuned model as an integer model (`haqjax.jobs.export`):
                    model.onnx, model.stablehlo, encodings.json, weights.bin and
                    results.json; its test top-1 is the job's `test_top1`
                    (--noexport skips it)
  uniform_reference/
                    the same fine-tune of the uniform policy a ratio budget
                    refers to (`haqjax.jobs.uniform`)
  plots/            bits.png and uniform.png
  results.json      every stage's figures, written last

Unlike the RL and Gumbel searches, nothing here trains or scores policies:
the search is one sensitivity pass (second-order, a few batches) and an
integer program solved in seconds, so a budget sweep (`pareto`) is free.
"""

from __future__ import annotations

import itertools
import os
import shlex
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from haqjax import data as haq_data
from haqjax import hardware
from haqjax.bitwidths import FLOAT_BITS
from haqjax.jobs import stages
from haqjax.jobs import uniform
from haqjax.policy import Policy
from haqjax.search.config import SearchConfig
from haqjax.search.hawq import greedy
from haqjax.search.hawq import ilp
from haqjax.search.hawq import measure
from haqjax.search.hawq.config import RESUMABLE_CHANGES
from haqjax.search.hawq.config import HawqConfig
from haqjax.search.hawq.problem import Problem
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import steps
from haqjax.train import trainer
from haqjax.train.config import Config

SENSITIVITY_FILE = "sensitivity.json"
# Budgets of the Pareto front results.json records (ILP, same tables).
PARETO_POINTS = 8


def check(config: Config, search: SearchConfig, hawq: HawqConfig, splits) -> None:
  """The allocation's own checks, before any training."""
  hawq.bits(search.min_bits, search.max_bits)
  available = haq_data.num_batches(splits.train, config.batch_size, drop_remainder=True)
  if hawq.hawq_batches > available:
    raise ValueError(f"hawq_batches={hawq.hawq_batches} needs {hawq.hawq_batches} batches "
                     f"of {config.batch_size}; the training split has {available}")


def measured_bits(bits: tuple[int, ...], fixed: np.ndarray) -> tuple[int, ...]:
  """Candidates plus the fixed layers' integer bits (their errors are needed too)."""
  extra = {int(b) for b in fixed if 0 < b < FLOAT_BITS}
  return tuple(sorted(set(bits) | extra))


def fp32_variables(config: Config, model, splits, fp32_dir: str) -> dict[str, Any]:
  """The FP32 run's weights in `model`'s variables, quantizer parameters zero.

  The sensitivity pass runs the model in floating point and calibrates each
  quantizer afresh for every bit-width, so it needs neither initialised nor
  calibrated quantizer parameters: the variables' structure comes from
  `jax.eval_shape` of `steps.init_state`, which runs nothing (the quickstart
  CNN's init, run op by op, took about 8 s on 2 CPU cores).
  """
  tx = optax.identity()
  shapes = jax.eval_shape(lambda: steps.init_state(jax.random.key(0), model, tx,
                                                   (1, *splits.spec.image_shape)))
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  state = trainer.merge_variables(state, ckpt_lib.restore_variables(fp32_dir), tx,
                                  source=f"the FP32 model in {fp32_dir!r}",
                                  model=config.model)
  return state.variables()


def sensitivity_stage(config: Config, search: SearchConfig, hawq: HawqConfig,
                      setup: stages.Setup) -> measure.Sensitivity:
  """`sensitivity.json`: measured once, read back on a rerun."""
  path = os.path.join(setup.workdir, SENSITIVITY_FILE)
  if os.path.exists(path):
    done = measure.read_sensitivity(path)
    if (done.names == setup.table.names and done.granularity == hawq.hawq_granularity
        and done.traces.curvature == hawq.hawq_curvature):
      return done
  bits = hawq.bits(search.min_bits, search.max_bits)
  wall, splits = setup.wall, setup.splits
  model = trainer.build_model(stages.qat_config(config, search, policy="w8a8"),
                              splits.spec.num_classes)
  variables = fp32_variables(config, model, splits, setup.fp32_dir)
  batches = list(itertools.islice(haq_data.batches(
      splits.train, batch_size=config.batch_size, seed=config.seed, epoch=0, shuffle=True,
      drop_remainder=True), hawq.hawq_batches))
  result = measure.sensitivity_pass(
      jax.random.key(config.seed), model, variables, batches,
      w_bits=measured_bits(bits, wall.fixed.w), a_bits=measured_bits(bits, wall.fixed.a),
      probes=hawq.hawq_probes, tol=hawq.hawq_tolerance,
      max_iterations=hawq.hawq_max_iterations, label_smoothing=config.label_smoothing,
      curvature=hawq.hawq_curvature, granularity=hawq.hawq_granularity)
  measure.write_sensitivity(path, result)
  return result


def build_problem(search: SearchConfig, hawq: HawqConfig, setup: stages.Setup,
                  sensitivity: measure.Sensitivity) -> Problem:
  """The allocation problem: Omega, the wall's cost table, limit and fixed layers."""
  bits = hawq.bits(search.min_bits, search.max_bits)
  wall = setup.wall
  return Problem.create(setup.table.names, sensitivity.omega, wall.tensor, wall.limit,
                        w_bits=bits, a_bits=bits, fixed_w=wall.fixed.w,
                        fixed_a=wall.fixed.a, label=str(search.budget_spec()),
                        unit=hardware.base.UNITS[search.budget_spec().metric])


def allocate(problem: Problem, allocator: str, sensitivity: measure.Sensitivity) -> Policy:
  """The policy of `allocator` ('ilp', 'greedy' or 'monotone')."""
  if allocator == "ilp":
    return ilp.solve(problem)
  if allocator == "greedy":
    return greedy.solve(problem)
  return ilp.solve_monotone(problem, sensitivity.traces.weight,
                            sensitivity.traces.activation)


def pareto(problem: Problem) -> list[dict[str, Any]]:
  """The ILP's allocations at `PARETO_POINTS` limits, cheapest to dearest."""
  return [{"limit": p.limit, "cost": p.cost, "omega": p.omega,
           "w_bits": np.asarray(p.policy.w_bits).tolist(),
           "a_bits": np.asarray(p.policy.a_bits).tolist(), "seconds": p.seconds}
          for p in ilp.pareto_front(problem, ilp.budget_grid(problem, PARETO_POINTS))]


def search_and_evaluate(config: Config, search: SearchConfig, hawq: HawqConfig,
                        workdir: str, command: str | None = None, *, export: bool = True,
                        seeds: int = 1) -> dict[str, Any]:
  """FP32 model -> sensitivities -> bit allocation -> fine-tune -> test -> results.

  With a ratio budget of a uniform wXaY, that uniform policy is fine-tuned and
  tested too (`haqjax.jobs.uniform`).

  Args:
    config: training settings: the FP32 stage, the batch size (of the
      sensitivity batches) and the quantizers whose errors are measured.
    search: target, budget, bit range and the final fine-tune.
    hawq: the sensitivity pass and the allocator.
    workdir: where everything goes; a rerun resumes.
    command: the command line to record (default: sys.argv).
    export: write the fine-tuned model's integer model to `export/`
      (`haqjax.jobs.export`) and report its test top-1, the fake-quant one
      beside it; False (`--noexport`) reports the fake-quant figures.
    seeds: fine-tune the found policy (and the uniform reference) over this
      many seeds as one vmapped job (`haqjax.train.seeds`); its test top-1
      is then the members' mean, with their std and figures beside it.

  Returns:
    The figures written to `results.json`.
  """
  def check_all(splits, table, wall):
    del table
    check(config, search, hawq, splits)
    uniform.check(search, wall)

  setup = stages.prepare(
      config, search, workdir, extra=[("hawq_config.json", hawq, RESUMABLE_CHANGES)],
      check=check_all)
  fp32_val = stages.fp32_val_top1(config, search, setup)
  t0 = time.perf_counter()
  sensitivity = sensitivity_stage(config, search, hawq, setup)
  setup.timings["sensitivity_seconds"] = time.perf_counter() - t0
  problem = build_problem(search, hawq, setup, sensitivity)
  t0 = time.perf_counter()
  policy = allocate(problem, hawq.hawq_allocator, sensitivity)
  setup.timings["allocation_seconds"] = time.perf_counter() - t0
  setup.timings["search_seconds"] = (setup.timings["sensitivity_seconds"]
                                     + setup.timings["allocation_seconds"])
  omega, _ = problem.evaluate(policy)
  front = pareto(problem)
  traces = sensitivity.traces
  policy_path, cost = stages.save_search_policy(
      config, search, setup, policy,
      {"algorithm": "hawq", "allocator": hawq.hawq_allocator, "omega": omega,
       "fp32_val_top1": fp32_val, "sensitivity": SENSITIVITY_FILE})
  finetuned = stages.finetune(config, search, setup, policy_path, seeds)
  top1 = stages.export_stage(config, setup, setup.workdir, finetuned, export)
  versus = uniform.comparison(config, search, setup, top1, cost["cost"], export, seeds)
  results = {
      **stages.common_results("hawq", config, search, setup, policy, cost, fp32_val,
                              finetuned, top1),
      **versus,
      "allocator": hawq.hawq_allocator, "omega": omega,
      "weight_traces": traces.weight.tolist(), "activation_traces": traces.activation.tolist(),
      "trace_iterations": traces.iterations, "trace_probes": traces.probes,
      "traces_converged": traces.converged, "pareto": front,
      **setup.timings, "total_seconds": time.perf_counter() - setup.t_start,
  }
  write_outputs(setup.workdir, results, setup.table, policy, search,
                command or " ".join(shlex.quote(a) for a in sys.argv))
  return results


def write_outputs(workdir: str, results: dict[str, Any], table, policy: Policy,
                  search: SearchConfig, command: str) -> None:
  """Plots, then results.json (last), report.md/html and the summary on stderr."""
  stages.plot_policy(workdir, results, table, policy, "HAWQ allocation",
                     reference=uniform.reference_bits(search))
  uniform.plot_comparison(workdir, results, search, "HAWQ")
  stages.write_report(workdir, results, command)
