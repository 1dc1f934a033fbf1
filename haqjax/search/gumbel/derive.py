"""The discrete policy a differentiable search ends with, within the budget.

The search leaves per-layer probabilities over the candidate bit-widths,
`p_w[l, k]` and `p_a[l, k]`. Its argmax policy rarely costs exactly the
budget: the Lagrangian settles the *expected* cost there, and the argmax of a
skewed distribution may cost more. Two derivations bring it within the budget:

- 'map' (default): the most probable policy within the budget,

      max  sum_l log p_w[l, w_l] + log p_a[l, a_l]
      s.t. sum_l cost[l, w_l, a_l] <= limit,

  the same multiple-choice knapsack as HAWQ-V3's allocation with `Omega =
  -log p`, solved exactly by `haqjax.search.hawq.ilp`. When the argmax fits
  it is the answer; otherwise it gives up the least log-probability that
  saves enough cost, wherever in the network, among the candidates only.
- 'wall': HAQ's budget wall (`BudgetWall.enforce`) on the argmax, which
  lowers bits one at a time from the last layer up, activations before
  weights, until the policy fits. It ignores the probabilities, so on a
  target where the last layers are cheap (Bit Fusion's latency) it lowers
  several layers a bit each to close a 1% excess.
"""

from __future__ import annotations

import numpy as np

from haqjax.hardware.budget import TABLE_BITS
from haqjax.hardware.budget import table_index
from haqjax.search import env as env_lib
from haqjax.search.hawq import ilp
from haqjax.search.hawq.problem import Problem

DERIVATIONS = ("map", "wall")
# Probabilities below this count as this (log 0 is not a finite objective).
_FLOOR = 1e-30


def check_derivation(derivation: str) -> None:
  if derivation not in DERIVATIONS:
    raise ValueError(f"gumbel_derive={derivation!r} is not allowed; allowed: "
                     f"{', '.join(DERIVATIONS)}")


def argmax(w_probs: np.ndarray, a_probs: np.ndarray, w_rows: np.ndarray,
           a_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The argmax bits `([L], [L])` of `[L, K]` probabilities over `[L, K]` candidates."""
  rows = np.arange(len(w_rows))
  return (np.asarray(w_rows)[rows, np.argmax(w_probs, -1)],
          np.asarray(a_rows)[rows, np.argmax(a_probs, -1)])


def most_probable(w_probs: np.ndarray, a_probs: np.ndarray, w_rows: np.ndarray,
                  a_rows: np.ndarray, wall: env_lib.BudgetWall
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The policy of highest log-probability whose cost is within `wall`'s budget.

  Args:
    w_probs, a_probs: `[L, K]` probabilities of the candidates.
    w_rows, a_rows: `[L, K]` candidate bit-widths per layer (a fixed layer's
      row repeats its bits; `supernet.candidate_rows`).
    wall: the budget, its cost table and the fixed layers.

  Returns:
    `(w_bits, a_bits)`, each `[L]`.
  """
  w_rows, a_rows = np.asarray(w_rows, np.int64), np.asarray(a_rows, np.int64)
  n, size = len(w_rows), len(TABLE_BITS)
  log_w = np.full((n, size), -np.inf)
  log_a = np.full((n, size), -np.inf)
  for l in range(n):  # A repeated candidate (a fixed layer's row) keeps its best entry.
    np.maximum.at(log_w[l], table_index(w_rows[l]),
                  np.log(np.maximum(np.asarray(w_probs[l], np.float64), _FLOOR)))
    np.maximum.at(log_a[l], table_index(a_rows[l]),
                  np.log(np.maximum(np.asarray(a_probs[l], np.float64), _FLOOR)))
  omega = -(log_w[:, :, None] + log_a[:, None, :])  # [L, 9, 9], inf off the candidates
  free_w, free_a = wall.fixed.w < 0, wall.fixed.a < 0
  problem = Problem.create(
      [str(l) for l in range(n)], np.where(np.isfinite(omega), omega, 0.0), wall.tensor,
      wall.limit, w_bits=sorted(set(w_rows[free_w].ravel().tolist())) or [8],
      a_bits=sorted(set(a_rows[free_a].ravel().tolist())) or [8],
      fixed_w=wall.fixed.w, fixed_a=wall.fixed.a, label=str(wall.budget))
  policy = ilp.solve(problem)
  return np.asarray(policy.w_bits, np.int64), np.asarray(policy.a_bits, np.int64)


def derive(derivation: str, w_probs: np.ndarray, a_probs: np.ndarray, w_rows: np.ndarray,
           a_rows: np.ndarray, wall: env_lib.BudgetWall) -> tuple[np.ndarray, np.ndarray]:
  """The policy `(w_bits, a_bits)` of `derivation` ('map' or 'wall'), within the budget."""
  check_derivation(derivation)
  if derivation == "map":
    return most_probable(w_probs, a_probs, w_rows, a_rows, wall)
  w, a = wall.fixed.apply(*argmax(w_probs, a_probs, w_rows, a_rows))
  return wall.enforce(w, a)
