"""Resource budgets: the constraint a bit search must satisfy.

A budget is absolute (seconds, cycles, joules, bytes, BitOps) or a ratio of a
reference network cost: the all-W8A8 network (HAQ's latency and energy
budgets) or the floating-point one (32-bit weights: its model-size budget).
On integer accelerators a float layer runs at 8 bits (`effective_bits`), so
'fp32' and 'w8a8' references coincide for latency and energy.

The limit and the costs it is compared with come from one computation: the
budget's cost table `[L, 9, 9]` (each layer's cost at bits 1..8 and 32, cast
to float64), from which a network's cost is a float64 sum of its layers'
entries. A uniform policy's cost is then exactly its reference cost, so a
`1.0 x wXaY` budget holds uniform wXaY, and every comparison allows the
relative slack `RTOL`, far below one bit's step in cost.

Example::

    budget = Budget(metric="latency", value=0.5)          # 50% of W8A8
    limit = budget.resolve(target, layers)                # seconds
    ok = budget.fits(budget.cost(target, layers, w, a), limit)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from typing import Any

import jax
import numpy as np

from haqjax.bitwidths import FLOAT_BITS
from haqjax.hardware import base
from haqjax.hardware import cost as cost_lib
from haqjax.hardware.layers import Layers
from haqjax.typing import ArrayLike

KINDS = ("ratio", "absolute")
REFERENCES = ("w8a8", "fp32")
# Bit-widths of a cost table's weight and activation axes: 1..8, then 32.
TABLE_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
# Relative slack of every budget comparison: `cost <= limit * (1 + RTOL)`.
# Float64 sums of the same per-layer costs agree to ~1e-15 whatever their
# order; costs summed in float32 (`policy_cost`) are not covered.
RTOL = 1e-9
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


def _layers_key(layers: Layers) -> tuple[Any, ...]:
  """A hashable digest of `layers`' values (every field, shapes and bytes)."""
  leaves, treedef = jax.tree.flatten(layers)
  return (str(treedef),) + tuple(
      (np.shape(x), hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest())
      for x in leaves)


def cost_table(target: base.Target, layers: Layers, metric: str) -> np.ndarray:
  """Each layer's cost at every `TABLE_BITS` pair: float64 `[L, 9, 9]`.

  The last `TABLE_CACHE_SIZE` tables are kept, keyed by the target, the
  metric and the layers' values: a budget wall, its reference and a report
  ask for the same table, and some targets (Bit Fusion's tiled memory model)
  search loop orders for every bit pair. A copy is returned.
  """
  try:
    key = (target, metric, _layers_key(layers))
    hash(key)
  except TypeError:  # Traced layers (jax's tracer errors are TypeErrors) or unhashable.
    key = None
  if key is None or key not in _TABLES:
    t = cost_lib.cost_tensor(target, layers, np.asarray(TABLE_BITS, np.float32), metric)
    table = np.asarray(t, np.float64)
    if key is None:
      return table
    _TABLES[key] = table
    while len(_TABLES) > TABLE_CACHE_SIZE:
      _TABLES.popitem(last=False)
  _TABLES.move_to_end(key)
  return _TABLES[key].copy()


TABLE_CACHE_SIZE = 32
_TABLES: collections.OrderedDict[tuple[Any, ...], np.ndarray] = collections.OrderedDict()


def table_index(bits: ArrayLike) -> np.ndarray:
  """Index of `bits` (values of `TABLE_BITS`) along a cost table's axes."""
  b = np.asarray(bits)
  if not np.isin(b, TABLE_BITS).all():
    bad = b[~np.isin(b, TABLE_BITS)].reshape(-1)[0]
    raise ValueError(f"bits {float(bad):g} have no cost table entry; allowed: 1..8 or "
                     f"{FLOAT_BITS}")
  b = b.astype(np.int64)
  return np.where(b == FLOAT_BITS, len(TABLE_BITS) - 1, b - 1)


def table_cost(table: np.ndarray, w_bits: ArrayLike, a_bits: ArrayLike) -> np.ndarray:
  """Network cost(s) `[...]` of bits `[..., L]`: a float64 sum of table entries."""
  w, a = np.broadcast_arrays(table_index(w_bits), table_index(a_bits))
  return table[np.arange(table.shape[0]), w, a].sum(axis=-1)


def within(cost: ArrayLike, limit: float) -> np.ndarray:
  """`cost <= limit` up to the relative slack `RTOL` (float64, any shape)."""
  return np.asarray(cost, np.float64) <= limit * (1.0 + RTOL)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
  """A limit on one metric.

  Attributes:
    metric: a name of `hardware.base.METRICS`: 'latency', 'cycles' (or its
      parts 'compute_cycles', 'stall_cycles'), 'energy' (or its parts
      'compute_energy', 'sram_energy', 'dram_energy'), 'dram', 'size',
      'kmeans_size' (k-means weights: labels plus a `2**w`-centroid codebook
      per layer, HAQ's model-size budget) or 'bitops'.
    value: the limit: a fraction of the reference (kind 'ratio') or an amount
      in the metric's unit (kind 'absolute': s, cycles, J, bytes, bit-ops;
      `hardware.base.UNITS`).
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

  def table(self, target: base.Target, layers: Layers) -> np.ndarray:
    """The metric's float64 cost table `[L, 9, 9]` (see `cost_table`)."""
    return cost_table(target, layers, self.metric)

  def reference_in(self, table: np.ndarray) -> float:
    """The reference network's cost, summed from a cost table."""
    w, a = reference_bits(self.reference)
    n = table.shape[0]
    return float(table_cost(table, np.full(n, w), np.full(n, a)))

  def reference_cost(self, target: base.Target, layers: Layers) -> float:
    """The network cost the ratio refers to."""
    return self.reference_in(self.table(target, layers))

  def limit_from(self, reference_cost: float) -> float:
    """The absolute limit given the reference's cost (unused when absolute)."""
    if self.kind == "absolute":
      return float(self.value)
    if not reference_cost > 0:
      raise ValueError(f"budget {self} is a ratio of a reference that costs "
                       f"{reference_cost:g} {base.UNITS[self.metric]}; allowed: "
                       "a reference of positive cost, or an absolute budget")
    return float(self.value) * float(reference_cost)

  def resolve(self, target: base.Target, layers: Layers) -> float:
    """The absolute limit, in the metric's unit."""
    if self.kind == "absolute":
      return float(self.value)
    return self.limit_from(self.reference_cost(target, layers))

  def cost(self, target: base.Target, layers: Layers, w_bits: ArrayLike,
           a_bits: ArrayLike) -> np.ndarray:
    """Network cost(s) `[...]` of bits `[..., L]`, as the limit is computed."""
    return table_cost(self.table(target, layers), w_bits, a_bits)

  def fits(self, cost: ArrayLike, limit: float | None = None) -> np.ndarray:
    """Whether `cost` (any shape) is within the budget, up to `RTOL`.

    Args:
      cost: network cost(s) in the metric's unit (see `cost`).
      limit: the resolved limit; needed for a ratio budget (see `resolve`).
    """
    if limit is None:
      if self.kind != "absolute":
        raise ValueError("a ratio budget needs its resolved limit: "
                         "budget.fits(cost, budget.resolve(target, layers))")
      limit = self.value
    return within(cost, limit)

  def __str__(self) -> str:
    if self.kind == "ratio":
      return f"{self.metric} <= {self.value:g} x {self.reference}"
    return f"{self.metric} <= {self.value:g} {base.UNITS[self.metric]}"
