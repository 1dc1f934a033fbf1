"""The interface every hardware target implements, and config validation.

A target is a frozen, keyword-only dataclass holding the hardware's static
parameters (array sizes, clock, bandwidths, energies). Its one method,

    target.layer_cost(layers, w_bits, a_bits) -> dict[str, Array]

maps a `Layers` (arrays `[L]`) and bit arrays broadcastable to `[..., L]` to
per-layer costs `[..., L]` under the keys of `COST_KEYS` it supports. Bits are
traced data, so one compiled function serves every policy; the target itself
is hashable and passed to `jax.jit` as a static argument.

Cycles come split: `cycles = compute_cycles + stall_cycles`, the compute
schedule's cycles and the cycles it waits on memory beyond them (0 for a
target without a stall model). A target that models energy splits it the same
way: `energy_j = compute_energy_j + sram_energy_j + dram_energy_j` (arithmetic,
on-chip buffer accesses, off-chip traffic). Both hold up to float32 rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from haqjax.hardware.layers import Layers
from haqjax.typing import Array, ArrayLike

# Per-layer cost keys a target may return.
COST_KEYS = ("cycles", "compute_cycles", "stall_cycles", "latency_s", "energy_j",
             "compute_energy_j", "sram_energy_j", "dram_energy_j", "dram_bytes",
             "utilization")

# Metric names that searches optimise, mapped to their cost key. 'size',
# 'kmeans_size' (k-means weights: labels plus codebooks) and 'bitops' do not
# depend on the target (see haqjax.hardware.metrics).
METRICS = {
    "latency": "latency_s",
    "cycles": "cycles",
    "compute_cycles": "compute_cycles",
    "stall_cycles": "stall_cycles",
    "energy": "energy_j",
    "compute_energy": "compute_energy_j",
    "sram_energy": "sram_energy_j",
    "dram_energy": "dram_energy_j",
    "dram": "dram_bytes",
    "size": "size_bytes",
    "kmeans_size": "kmeans_size_bytes",
    "bitops": "bitops",
}
# Metrics that need no target model.
TARGET_FREE = ("size", "kmeans_size", "bitops")

# Units of each metric, for reports and budgets.
UNITS = {"latency": "s", "cycles": "cycles", "compute_cycles": "cycles",
         "stall_cycles": "cycles", "energy": "J", "compute_energy": "J",
         "sram_energy": "J", "dram_energy": "J", "dram": "bytes",
         "size": "bytes", "kmeans_size": "bytes", "bitops": "bit-ops"}


class Target(Protocol):
  """What `haqjax.hardware.cost` needs from a hardware model."""

  name: str

  def layer_cost(self, layers: Layers, w_bits: ArrayLike,
                 a_bits: ArrayLike) -> dict[str, Array]:
    ...


def check_positive(obj: Any, *fields: str) -> None:
  """Raises ValueError naming the first of `fields` of `obj` that is not > 0."""
  for f in fields:
    v = getattr(obj, f)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
      raise ValueError(f"{type(obj).__name__}.{f} is {v!r}; allowed: a positive number")


def check_int(obj: Any, *fields: str) -> None:
  """Raises ValueError naming the first of `fields` that is not a positive int."""
  for f in fields:
    v = getattr(obj, f)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{type(obj).__name__}.{f} is {v!r}; allowed: a positive integer")


def check_choice(obj: Any, field: str, allowed: tuple[str, ...]) -> None:
  v = getattr(obj, field)
  if v not in allowed:
    raise ValueError(f"{type(obj).__name__}.{field} is {v!r}; allowed: "
                     f"{', '.join(repr(a) for a in allowed)}")


def replace(target: Any, **changes: Any) -> Any:
  """`dataclasses.replace` with unknown fields reported as ValueError."""
  names = {f.name for f in dataclasses.fields(target)}
  unknown = sorted(set(changes) - names)
  if unknown:
    raise ValueError(f"{type(target).__name__} has no field {unknown[0]!r}; "
                     f"fields: {', '.join(sorted(names))}")
  return dataclasses.replace(target, **changes)
