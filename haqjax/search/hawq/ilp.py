"""HAWQ-V3's integer linear program, and the trace-monotone baseline.

`solve(problem)` picks one `(w, a)` per layer (per tied group) that
minimizes the summed sensitivity `Omega` under the budget:

    min  sum_{u,c} Omega[u, c] x[u, c]
    s.t. sum_c x[u, c] = 1                 (one choice per unit)
         sum_{u,c} cost[u, c] x[u, c] <= limit
         x binary

with `scipy.optimize.milp` (HiGHS, branch and bound, relative gap 0), so
the answer is optimal for the tables, for any metric and target (the cost
table makes them the same constraint). HiGHS's presolve is off: hardware
costs are discrete, the best allocation often costs exactly the limit, and
presolve's bound tightening cuts such an allocation off (it needs the
limit about 2e-7 higher); without it a problem of 100 layers x 36 choices
still solves in well under a second. The objective is shifted per unit
and scaled, and the cost row divided by the limit, so the solver's
absolute tolerances mean the same for seconds, joules or bytes; a solution
the float64 cost check (`haqjax.hardware.budget.within`) still finds over
the limit by the solver's feasibility tolerance is solved again under a
slightly lower bound.

`solve_monotone(problem, w_traces, a_traces)` is NNCF's HAWQ baseline: NNCF
(`HAWQPrecisionInitializer.get_configs_constrained_by_traces_order`)
enumerates the bit configurations that do not decrease along the layers
sorted by Hessian trace (a more sensitive layer never gets fewer bits than
a less sensitive one) and keeps the one of least perturbation that meets
the compression constraint. The ordering is linear in `x`, so the same
configuration is the ILP's with the ordering as constraints, without
enumerating the `C(L + B - 1, B - 1)` configurations; here it orders weight
bits by weight traces and activation bits by activation traces, among the
units free on that axis.

`pareto_front(problem, limits)` solves the ILP at each limit from the same
tables (a sweep of budgets costs seconds, with no training).

References:
  Yao et al. HAWQ-V3: Dyadic Neural Network Quantization. ICML 2021.
  https://arxiv.org/abs/2011.10680
  Huangfu & Hall. Parallelizing the dual revised simplex method.
  Mathematical Programming Computation 2018 (HiGHS).
"""

from __future__ import annotations

from collections.abc import Sequence
import time
from typing import NamedTuple

import numpy as np
from scipy import optimize

from haqjax.hardware.budget import RTOL
from haqjax.policy import Policy
from haqjax.search.hawq.problem import Problem

# Retries under a lower bound when the solver's answer fails the float64 check.
_RETRIES = 6
# The solver's primal feasibility tolerance (HiGHS's default), on the
# limit-scaled cost row.
_SOLVER_TOL = 1e-7


class Point(NamedTuple):
  """One budget of a Pareto front: the limit, its policy, `Omega` and cost."""
  limit: float
  policy: Policy
  omega: float
  cost: float
  seconds: float


def _offsets(problem: Problem) -> np.ndarray:
  return np.cumsum([0] + [len(u.choices) for u in problem.units])


def _order_rows(problem: Problem, traces: np.ndarray, axis: int) -> list[np.ndarray]:
  """Rows `bits(more sensitive) - bits(less sensitive) >= 0` along `axis` (0: w, 1: a).

  Units free on that axis are sorted by their summed traces (stably), and
  each is tied to the next, which orders them all.
  """
  offsets = _offsets(problem)
  free = [i for i, u in enumerate(problem.units)
          if len(np.unique(u.choices[:, axis])) > 1]
  key = [float(np.sum(traces[list(problem.units[i].layers)])) for i in free]
  ordered = [free[i] for i in np.argsort(key, kind="stable")]
  rows = []
  for lo, hi in zip(ordered, ordered[1:]):
    row = np.zeros(offsets[-1])
    for sign, i in ((-1.0, lo), (1.0, hi)):
      unit = problem.units[i]
      bits = np.array([unit.bits(c)[axis] for c in range(len(unit.choices))], np.float64)
      row[offsets[i]:offsets[i + 1]] = sign * bits
    rows.append(row)
  return rows


def _solve(problem: Problem, order_rows: Sequence[np.ndarray] = ()) -> Policy:
  problem.check_feasible()
  offsets = _offsets(problem)
  units = problem.units
  objective = np.concatenate([u.omega - u.omega.min() for u in units])
  objective = objective / max(float(np.abs(objective).max()), 1e-300)
  one_hot = np.zeros((len(units), offsets[-1]))
  for i in range(len(units)):
    one_hot[i, offsets[i]:offsets[i + 1]] = 1.0
  scale = problem.limit if problem.limit > 0 else 1.0
  cost_row = np.concatenate([u.cost for u in units])[None, :] / scale
  constraints = [optimize.LinearConstraint(one_hot, 1.0, 1.0)]
  if order_rows:
    constraints.append(optimize.LinearConstraint(np.stack(order_rows), 0.0, np.inf))
  bound = problem.limit / scale * (1.0 + RTOL)
  picks = None
  for attempt in range(_RETRIES):
    result = optimize.milp(
        objective, integrality=np.ones(offsets[-1]), bounds=optimize.Bounds(0.0, 1.0),
        constraints=[*constraints, optimize.LinearConstraint(cost_row, -np.inf, bound)],
        options={"mip_rel_gap": 0.0, "presolve": False})
    if result.x is None:
      if picks is not None:  # Only the retries' lower bounds left nothing.
        break
      unit = f" {problem.unit}" if problem.unit else ""
      what = "the trace ordering" if order_rows else "the candidate bits"
      raise ValueError(f"budget {problem.label} ({problem.limit:.4g}{unit}) has no "
                       f"allocation under {what}: {result.message}; allowed: a larger "
                       "budget")
    picks = [int(np.argmax(result.x[offsets[i]:offsets[i + 1]])) for i in range(len(units))]
    policy = problem.policy(picks)
    if problem.fits(policy):
      return policy
    bound -= _SOLVER_TOL * 2 ** attempt
  policy = _repair(problem, picks, order_rows)
  if policy is None:
    raise ValueError(f"budget {problem.label}: the solver's allocations exceed the limit "
                     f"by more than its tolerance after {_RETRIES} tries")
  return policy


def _repair(problem: Problem, picks: list[int],
            order_rows: Sequence[np.ndarray]) -> Policy | None:
  """The solver's last answer, made to fit by cheaper choices.

  The solver may exceed the limit by its feasibility tolerance. Where the
  choices that would close that gap differ by less than it (a limit at the
  lowest achievable cost, costs a few 1e-7 apart), a lower bound has no
  allocation at all. Then choices are moved, one at a time, to the cheaper
  choice that adds the least `Omega` per unit of cost saved (keeping the
  trace ordering), until the float64 check holds. Returns None if no such
  move is left.
  """
  offsets = _offsets(problem)
  rows = np.stack(order_rows) if order_rows else None
  picks = list(picks)

  def ordered(trial):
    if rows is None:
      return True
    x = np.zeros(offsets[-1])
    x[offsets[:-1] + np.asarray(trial)] = 1.0
    return bool((rows @ x >= -1e-9).all())

  while not problem.fits(problem.policy(picks)):
    best = None
    for i, u in enumerate(problem.units):
      for c in range(len(u.choices)):
        saved = u.cost[picks[i]] - u.cost[c]
        trial = [*picks[:i], c, *picks[i + 1:]]
        if saved <= 0 or not ordered(trial):
          continue
        score = (u.omega[c] - u.omega[picks[i]]) / saved
        if best is None or score < best[0]:
          best = (score, i, c)
    if best is None:
      return None
    picks[best[1]] = best[2]
  return problem.policy(picks)


def solve(problem: Problem) -> Policy:
  """The allocation of least total `Omega` within the budget (HAWQ-V3's ILP).

  Raises:
    ValueError: the budget is below the lowest achievable cost (one line
      naming the budget and that cost).
  """
  return _solve(problem)


def solve_monotone(problem: Problem, w_traces: np.ndarray, a_traces: np.ndarray) -> Policy:
  """The least-`Omega` allocation within the budget whose bits follow the traces.

  Args:
    problem: the allocation problem.
    w_traces: `[L]` weight Hessian traces (more: no fewer weight bits).
    a_traces: `[L]` activation Hessian traces (more: no fewer activation bits).
  """
  rows = (_order_rows(problem, np.asarray(w_traces, np.float64), 0)
          + _order_rows(problem, np.asarray(a_traces, np.float64), 1))
  return _solve(problem, rows)


def budget_grid(problem: Problem, count: int) -> np.ndarray:
  """`count` limits evenly spaced from the lowest to the highest allocation cost."""
  low = problem.min_cost()
  high = float(sum(u.cost.max() for u in problem.units))
  return np.linspace(low, high, count)


def pareto_front(problem: Problem, limits: Sequence[float]) -> list[Point]:
  """The ILP's allocation at each limit (absolute, in the metric's unit).

  Raises:
    ValueError: a limit below the lowest achievable cost.
  """
  points = []
  for limit in limits:
    t0 = time.perf_counter()
    policy = solve(problem.with_limit(limit))
    omega, cost = problem.evaluate(policy)
    points.append(Point(limit=float(limit), policy=policy, omega=omega, cost=cost,
                        seconds=time.perf_counter() - t0))
  return points
