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

import jax.numpy as jnp

from haqjax.hardware import base
from haqjax.hardware import cost as cost_lib
from haqjax.hardware.layers import FLOAT_BITS
from haqjax.hardware.layers import Layers
from haqjax.typing import Array, ArrayLike

KINDS = ("ratio", "absolute")
REFERENCES = ("w8a8", "fp32")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
  """A limit on one metric.

  Attributes:
    metric: one of 'latency', 'cycles', 'energy', 'dram', 'size', 'bitops'.
    value: the limit: a fraction of the reference (kind 'ratio') or an amount
      in the metric's unit (kind 'absolute': s, cycles, J, bytes, bit-ops).
    kind: 'ratio' or 'absolute'.
    reference: network a ratio refers to: 'w8a8' or 'fp32'.
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
    base.check_choice(self, "reference", REFERENCES)

  def reference_cost(self, target: base.Target, layers: Layers) -> float:
    """The network cost the ratio refers to."""
    bits = 8 if self.reference == "w8a8" else FLOAT_BITS
    return cost_lib.uniform_cost(target, layers, bits, bits, self.metric)

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
