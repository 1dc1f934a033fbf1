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


def by_bits(probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """`[L, len(TABLE_BITS)]`: each bit-width's probability, summed over the
  candidates that stand for it (a repeated candidate: a fixed layer's row, or a
  widened one, `supernet.widen_dominated`); 0 where none does."""
  rows = np.asarray(rows, np.int64)
  out = np.zeros((len(rows), len(TABLE_BITS)))
  for l in range(len(rows)):
    np.add.at(out[l], table_index(rows[l]), np.asarray(probs[l], np.float64))
  return out


def argmax(w_probs: np.ndarray, a_probs: np.ndarray, w_rows: np.ndarray,
           a_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The most probable bits `([L], [L])` of `[L, K]` probabilities over `[L, K]`
  candidates (a repeated candidate's probabilities summed)."""
  table = np.asarray(TABLE_BITS, np.int64)
  return (table[np.argmax(by_bits(w_probs, w_rows), -1)],
          table[np.argmax(by_bits(a_probs, a_rows), -1)])


def most_probable(w_probs: np.ndarray, a_probs: np.ndarray, w_rows: np.ndarray,
                  a_rows: np.ndarray, wall: env_lib.BudgetWall
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The policy of highest log-probability whose cost is within `wall`'s budget.

  Args:
    w_probs, a_probs: `[L, K]` probabilities of the candidates.
    w_rows, a_rows: `[L, K]` candidate bit-widths per layer (a fixed layer's
      row repeats its bits, `supernet.candidate_rows`; so may a widened one,
      `supernet.widen_dominated`: a bit-width's probability is the sum over
      the candidates that stand for it).
    wall: the budget, its cost table and the fixed layers.

  Returns:
    `(w_bits, a_bits)`, each `[L]`.
  """
  w_rows, a_rows = np.asarray(w_rows, np.int64), np.asarray(a_rows, np.int64)
  n = len(w_rows)

  def log_p(probs, rows):  # -inf off the candidates
    p = by_bits(probs, rows)
    present = np.zeros(p.shape, bool)
    present[np.arange(n)[:, None], table_index(rows)] = True
    return np.where(present, np.log(np.maximum(p, _FLOOR)), -np.inf)

  log_w, log_a = log_p(w_probs, w_rows), log_p(a_probs, a_rows)
  omega = -(log_w[:, :, None] + log_a[:, None, :])  # [L, 9, 9], inf off the candidates
  free_w, free_a = wall.fixed.w < 0, wall.fixed.a < 0
  problem = Problem.create(
      [str(l) for l in range(n)], np.where(np.isfinite(omega), omega, 0.0), wall.tensor,
      wall.limit, w_bits=sorted(set(w_rows[free_w].ravel().tolist())) or [8],
      a_bits=sorted(set(a_rows[free_a].ravel().tolist())) or [8],
      fixed_w=wall.fixed.w, fixed_a=wall.fixed.a, label=str(wall.budget),
      mask=np.isfinite(omega))  # Each layer's own candidates only.
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
