"""The greedy baseline of HAWQ allocation: lower the cheapest bit first.

Start every layer (tied group) at its highest candidate bits, weights and
activations. While over the budget, consider every one-step move: one
unit's weight bits, or its activation bits, down to the next lower
candidate. Take the move with the smallest sensitivity increase per unit of
cost saved, `(Omega_new - Omega_old) / (cost_old - cost_new)` (moves that
save nothing are skipped), and repeat. This is the marginal-utility
heuristic of knapsack-style bit allocation; unlike the ILP
(`haqjax.search.hawq.ilp`) it can stop at a worse allocation, which is what
it is here to show.
"""

from __future__ import annotations

import numpy as np

from haqjax.hardware.budget import RTOL
from haqjax.policy import Policy
from haqjax.search.hawq.problem import Problem
from haqjax.search.hawq.problem import Unit


def _grid(unit: Unit) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], int]]:
  """A unit's candidate table indices per axis (increasing) and choice lookup."""
  ws = np.unique(unit.choices[:, 0])
  as_ = np.unique(unit.choices[:, 1])
  lookup = {(int(w), int(a)): c for c, (w, a) in enumerate(unit.choices)}
  return ws, as_, lookup


def _cheaper(unit: Unit, pick: int, pos: np.ndarray, axis: int, choice
             ) -> tuple[np.ndarray, int, float] | None:
  """`(position, choice, cost saved)` of the next lower candidate on `axis`
  that costs less than `pick`, or None."""
  p = pos.copy()
  while p[axis] > 0:
    p[axis] -= 1
    c = choice(p)
    if c is None:
      return None
    saved = float(unit.cost[pick] - unit.cost[c])
    if saved > 0:
      return p, c, saved
  return None


def solve(problem: Problem) -> Policy:
  """The greedy allocation (see the module docstring).

  Raises:
    ValueError: the budget is below the lowest achievable cost, or the
      moves run out before the policy fits (a cost that grows when bits
      are lowered).
  """
  problem.check_feasible()
  limit = problem.limit * (1.0 + RTOL)
  grids = [_grid(u) for u in problem.units]
  # Position of each unit on its weight and activation candidate lists.
  pos = np.array([[len(ws) - 1, len(as_) - 1] for ws, as_, _ in grids])

  def choice(i: int, p) -> int | None:
    ws, as_, lookup = grids[i]
    return lookup.get((int(ws[p[0]]), int(as_[p[1]])))

  picks = [choice(i, pos[i]) for i in range(len(grids))]
  if any(c is None for c in picks):  # Choices are a product grid per unit.
    raise ValueError("a unit's candidates are not a weight x activation grid")
  total = sum(float(u.cost[c]) for u, c in zip(problem.units, picks))
  while total > limit:
    best = None
    for i, unit in enumerate(problem.units):
      for axis in (0, 1):
        move = _cheaper(unit, picks[i], pos[i], axis, lambda p, i=i: choice(i, p))
        if move is None:
          continue
        p, c, saved = move
        ratio = float(unit.omega[c] - unit.omega[picks[i]]) / saved
        if best is None or ratio < best[0]:
          best = (ratio, i, p, c, saved)
    if best is None:
      raise ValueError(f"budget {problem.label}: the greedy moves ran out at cost "
                       f"{total:.6g} {problem.unit}, above the limit {problem.limit:.6g}")
    _, i, p, c, saved = best
    pos[i], picks[i] = p, c
    total -= saved
  return problem.policy(picks)
