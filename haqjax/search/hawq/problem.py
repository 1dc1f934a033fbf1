"""The bit allocation problem: one `(w, a)` per layer, least `Omega` within a budget.

Every allocator (`ilp`, `greedy`, the monotone baseline) solves the same
problem, built from two tables on the hardware cost table's axes (`[L, 9,
9]` over `haqjax.hardware.budget.TABLE_BITS`, `budget.table_index`): the
sensitivity `Omega` (`haqjax.search.hawq.sensitivity.perturbation_table`)
and the cost of one budget metric (`Budget.table`, `BudgetWall.tensor`).
Since a network's cost is the sum of its layers' entries, every metric and
target (latency, energy, size, BitOps; BISMO, BitFusion, ...) is the same
linear constraint.

Layers choose among candidate bit-widths (`w_bits` x `a_bits`); a fixed
layer (`haqjax.search.env.Fixed`: HAQ's W8 first layer on a float input,
W8A8 classifier) has its one choice on that axis, and tied layers (`ties`:
groups of layer indices, e.g. layers that share an input quantizer) take
one choice together. Internally a tied group is one unit whose choices are
those allowed to all its members, with its members' `Omega`s and costs
summed; an untied layer is a unit of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np

from haqjax.bitwidths import FLOAT_BITS
from haqjax.hardware.budget import TABLE_BITS
from haqjax.hardware.budget import table_index
from haqjax.hardware.budget import within
from haqjax.policy import Policy

_BITS = np.asarray(TABLE_BITS, np.int64)


@dataclasses.dataclass(frozen=True)
class Unit:
  """Layers that take one choice: its candidates and their summed tables.

  Attributes:
    layers: layer indices (one, or a tied group).
    choices: `[C, 2]` table indices `(w, a)` allowed for every member.
    omega: `[C]` summed `Omega` of each choice.
    cost: `[C]` summed cost of each choice.
  """
  layers: tuple[int, ...]
  choices: np.ndarray
  omega: np.ndarray
  cost: np.ndarray

  def bits(self, c: int) -> tuple[int, int]:
    """`(w_bits, a_bits)` of choice `c`."""
    wi, ai = self.choices[c]
    return int(_BITS[wi]), int(_BITS[ai])


@dataclasses.dataclass(frozen=True)
class Problem:
  """A bit allocation problem (build it with `Problem.create`).

  Attributes:
    names: layer names (layer-table order).
    omega: `[L, 9, 9]` sensitivity table.
    cost: `[L, 9, 9]` cost table of the budget metric (float64).
    limit: the budget's absolute limit, in the metric's unit.
    units: the layers grouped into units (ties; singletons otherwise).
    label: the budget as error messages name it (e.g. 'latency <= 0.5 x w8a8').
    unit: the metric's unit, for messages.
  """
  names: tuple[str, ...]
  omega: np.ndarray
  cost: np.ndarray
  limit: float
  units: tuple[Unit, ...]
  label: str
  unit: str

  @classmethod
  def create(cls, names: Sequence[str], omega: np.ndarray, cost: np.ndarray,
             limit: float, *, w_bits: Sequence[int], a_bits: Sequence[int],
             fixed_w: np.ndarray | None = None, fixed_a: np.ndarray | None = None,
             ties: Sequence[Sequence[int]] = (), label: str = "budget",
             unit: str = "", mask: np.ndarray | None = None) -> Problem:
    """A validated problem.

    Args:
      names: layer names, `[L]`.
      omega: `[L, 9, 9]` sensitivities, finite wherever a choice is allowed.
      cost: `[L, 9, 9]` costs.
      limit: the absolute limit.
      w_bits: candidate weight bit-widths (1..8, or 32).
      a_bits: candidate activation bit-widths.
      fixed_w: `[L]` a layer's only weight bits, -1 where free (`Fixed.w`).
      fixed_a: `[L]` the same for activations (`Fixed.a`).
      ties: groups of layer indices that take one choice together.
      label: the budget, as messages name it.
      unit: the metric's unit.
      mask: `[L, 9, 9]` bool, the choices a layer may take besides the bits
        above (a layer's own candidates); all where None.

    Raises:
      ValueError: tables of other shapes, a tie naming a layer twice or out
        of range, a tied group with no common choice, or an allowed choice
        without a finite `Omega`.
    """
    names = tuple(names)
    n = len(names)
    shape = (n, len(TABLE_BITS), len(TABLE_BITS))
    omega, cost = np.asarray(omega, np.float64), np.asarray(cost, np.float64)
    for field, table in (("omega", omega), ("cost", cost)):
      if table.shape != shape:
        raise ValueError(f"{field} has shape {table.shape}; allowed: {shape} (layers, "
                         "weight bits, activation bits on TABLE_BITS)")
    fixed_w = np.full(n, -1) if fixed_w is None else np.asarray(fixed_w)
    fixed_a = np.full(n, -1) if fixed_a is None else np.asarray(fixed_a)
    allowed_w = np.zeros((n, len(TABLE_BITS)), bool)
    allowed_a = np.zeros((n, len(TABLE_BITS)), bool)
    for allowed, bits, fixed in ((allowed_w, w_bits, fixed_w), (allowed_a, a_bits, fixed_a)):
      allowed[:, table_index(list(bits))] = True
      for l in np.flatnonzero(fixed >= 0):
        allowed[l] = False
        allowed[l, table_index(fixed[l])] = True
    allowed = allowed_w[:, :, None] & allowed_a[:, None, :]  # [L, 9, 9]
    if mask is not None:
      allowed &= np.asarray(mask, bool)
    bad = allowed & ~np.isfinite(omega)
    if bad.any():
      l, wi, ai = np.argwhere(bad)[0]
      raise ValueError(f"omega of layer {l} ({names[l]!r}) at w{_BITS[wi]}a{_BITS[ai]} is "
                       f"{omega[l, wi, ai]}; allowed: finite for every candidate (measure "
                       "the sensitivity at these bits)")
    groups = _groups(ties, n)
    units = []
    for group in groups:
      common = np.logical_and.reduce([allowed[l] for l in group])
      if not common.any():
        raise ValueError(f"tied layers {list(group)} share no allowed (w, a) bits; "
                         "allowed: ties of layers with common candidates")
      choices = np.argwhere(common)  # [C, 2]
      rows = np.asarray(group)[:, None]
      units.append(Unit(layers=tuple(group), choices=choices,
                        omega=omega[rows, choices[:, 0], choices[:, 1]].sum(0),
                        cost=cost[rows, choices[:, 0], choices[:, 1]].sum(0)))
    return cls(names=names, omega=omega, cost=cost, limit=float(limit),
               units=tuple(units), label=label, unit=unit)

  def min_cost(self) -> float:
    """The lowest cost any allowed allocation reaches."""
    return float(sum(u.cost.min() for u in self.units))

  def check_feasible(self) -> None:
    """One-line ValueError when even the cheapest allocation exceeds the limit."""
    low = self.min_cost()
    if not within(low, self.limit):
      unit = f" {self.unit}" if self.unit else ""
      raise ValueError(f"budget {self.label} ({self.limit:.4g}{unit}) is below the minimum "
                       f"achievable cost {low:.6g}{unit} with these candidate bits and fixed "
                       "layers; allowed: a budget of at least that")

  def policy(self, picks: Sequence[int]) -> Policy:
    """The policy of one choice index per unit."""
    w = np.full(len(self.names), FLOAT_BITS, np.int64)
    a = np.full(len(self.names), FLOAT_BITS, np.int64)
    for u, c in zip(self.units, picks):
      for l in u.layers:
        w[l], a[l] = u.bits(int(c))
    return Policy.create(self.names, w, a)

  def evaluate(self, policy: Policy) -> tuple[float, float]:
    """`(total Omega, total cost)` of a policy, summed from the tables."""
    rows = np.arange(len(self.names))
    wi, ai = table_index(np.asarray(policy.w_bits)), table_index(np.asarray(policy.a_bits))
    return (float(self.omega[rows, wi, ai].sum()), float(self.cost[rows, wi, ai].sum()))

  def fits(self, policy: Policy) -> bool:
    """Whether `policy` is within the limit (up to `RTOL`)."""
    return bool(within(self.evaluate(policy)[1], self.limit))

  def with_limit(self, limit: float, label: str | None = None) -> Problem:
    """The same problem under another limit."""
    return dataclasses.replace(self, limit=float(limit),
                               label=label or f"cost <= {limit:.6g} {self.unit}".strip())


def _groups(ties: Sequence[Sequence[int]], n: int) -> list[tuple[int, ...]]:
  """Tied groups, then every other layer alone, ordered by first layer."""
  seen: set[int] = set()
  groups = []
  for tie in ties:
    tie = tuple(int(l) for l in tie)
    for l in tie:
      if not 0 <= l < n or l in seen:
        raise ValueError(f"ties name layer {l} {'twice' if l in seen else 'out of range'}; "
                         f"allowed: distinct layer indices in 0..{n - 1}")
      seen.add(l)
    if tie:
      groups.append(tie)
  groups += [(l,) for l in range(n) if l not in seen]
  return sorted(groups, key=lambda g: g[0])

