"""Resource budgets: the constraint a bit search must satisfy.

A budget is absolute (seconds, cycles, joules, bytes, BitOps) or a ratio of a
reference network cost: the all-W8A8 network (HAQ's latency and energy
budgets) or the floating-point one (32-bit weights: its model-size budget).
On integer accelerators a float layer runs at 8 bits (`effective_bits`), so
'fp32' and 'w8a8' references coincide for latency and energy.

Example::

    budget = Budget(metric="latency", value=0.5)          # 50% of W8A8
    limit = budget.resolve(target, layers)                # seconds
    ok = budget.fits(policy_cost(target, layers, w, a), limit)
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from haqjax.bitwidths import FLOAT_BITS
from haqjax.hardware import base
from haqjax.hardware import cost as cost_lib
from haqjax.hardware.layers import Layers
from haqjax.typing import Array, ArrayLike

KINDS = ("ratio", "absolute")
REFERENCES = ("w8a8", "fp32")
_UNIFORM = re.compile(r"^w([1-8])a([1-8])$")


def reference_bits(reference: str) -> tuple[int, int]:
  """(w, a) bits of a reference network: 'fp32', 'w8a8' or any 'wXaY'."""
  if reference == "fp32":
    return FLOAT_BITS, FLOAT_BITS
  m = _UNIFORM.match(reference)
  if not m:
    raise ValueError(f"Budget.reference is {reference!r}; allowed: fp32 or a "
                     "uniform network wXaY with X, Y in 1..8 (e.g. w8a8, w4a4)")
  return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
  """A limit on one metric.

  Attributes:
    metric: one of 'latency', 'cycles', 'energy', 'dram', 'size', 'bitops'.
    value: the limit: a fraction of the reference (kind 'ratio') or an amount
      in the metric's unit (kind 'absolute': s, cycles, J, bytes, bit-ops).
    kind: 'ratio' or 'absolute'.
    reference: network a ratio refers to: 'fp32' or uniform 'wXaY' ('w8a8'
      in HAQ; 'w4a4' with value 1 asks for "no more than uniform W4A4").
  """
  metric: str = "latency"
  value: float = 0.5
  kind: str = "ratio"
  reference: str = "w8a8"

  def __post_init__(self):
    if self.metric not in base.METRICS:
      raise ValueError(f"Budget.metric is {self.metric!r}; allowed: "
                       f"{', '.join(base.METRICS)}")
    base.check_positive(self, "value")
    base.check_choice(self, "kind", KINDS)
    reference_bits(self.reference)

  def reference_cost(self, target: base.Target, layers: Layers) -> float:
    """The network cost the ratio refers to."""
    w, a = reference_bits(self.reference)
    return cost_lib.uniform_cost(target, layers, w, a, self.metric)

  def resolve(self, target: base.Target, layers: Layers) -> float:
    """The absolute limit, in the metric's unit."""
    if self.kind == "absolute":
      return float(self.value)
    return float(self.value) * self.reference_cost(target, layers)

  def fits(self, cost: ArrayLike, limit: float | None = None) -> Array:
    """Whether `cost` (any shape) is within the budget.

    Args:
      cost: network cost(s) in the metric's unit.
      limit: the resolved limit; needed for a ratio budget (see `resolve`).
    """
    if limit is None:
      if self.kind != "absolute":
        raise ValueError("a ratio budget needs its resolved limit: "
                         "budget.fits(cost, budget.resolve(target, layers))")
      limit = self.value
    return jnp.asarray(cost) <= limit

  def __str__(self) -> str:
    if self.kind == "ratio":
      return f"{self.metric} <= {self.value:g} x {self.reference}"
    return f"{self.metric} <= {self.value:g} {base.UNITS[self.metric]}"
