"""A HAQ-format lookup table as a hardware target.

HAQ's latency/energy environments read a table `T[l, w-1, a-1]` of shape
`[layers, 8, 8]` (bits 1..8) and sum the entries of a policy. `TableTarget`
makes any such `.npy` file a target like the analytic ones: its values are
reported as `cycles` (or, with `unit='energy_j'`, as joules), and latency is
`cycles / clock_hz`. A table has no stall model and no energy split: its
cycles are all compute cycles (`stall_cycles` is 0), and an energy table
reports `energy_j` only.

References:
  K. Wang, Z. Liu, Y. Lin, J. Lin, S. Han, "HAQ: Hardware-Aware Automated
  Quantization with Mixed Precision", CVPR 2019.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from haqjax.hardware import base
from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import effective_bits
from haqjax.typing import Array, ArrayLike

UNITS = ("cycles", "energy_j")


def load_table(path: str) -> np.ndarray:
  """Reads and checks a HAQ-format `.npy` table `[layers, 8, 8]`."""
  if not os.path.isfile(path):
    raise ValueError(f"table file {path!r} does not exist")
  try:
    t = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    del e
    raise ValueError(f"table file {path!r} is not a .npy array") from None
  check_table(t, path)
  return t


def check_table(t: np.ndarray, source: str = "table") -> None:
  if t.ndim != 3 or t.shape[1:] != (8, 8):
    raise ValueError(f"{source} has shape {t.shape}; allowed: [layers, 8, 8] "
                     "indexed [layer, w_bits-1, a_bits-1]")
  if not np.issubdtype(t.dtype, np.number) or not np.all(np.isfinite(t)) or (t < 0).any():
    raise ValueError(f"{source} must hold finite, non-negative numbers")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TableTarget:
  """A `[layers, 8, 8]` lookup table (hashed by identity, so jit-static).

  Attributes:
    table: the values, `[L, 8, 8]`, indexed `[l, w-1, a-1]`.
    name: label for reports.
    unit: what the values are: 'cycles' or 'energy_j'.
    clock_hz: converts cycles to seconds (an assumption for HAQ's table,
      which does not state its clock).
    batch: the batch size the table was measured at.
  """
  table: np.ndarray
  name: str = "table"
  unit: str = "cycles"
  clock_hz: float = 200e6
  batch: int = 1

  def __post_init__(self):
    object.__setattr__(self, "table", np.asarray(self.table))
    check_table(self.table, f"{self.name}.table")
    base.check_choice(self, "unit", UNITS)
    base.check_positive(self, "clock_hz")
    base.check_int(self, "batch")

  @classmethod
  def from_file(cls, path: str, **kwargs) -> TableTarget:
    return cls(table=load_table(path), name=kwargs.pop("name", f"table:{path}"),
               **kwargs)

  def layer_cost(self, layers: Layers, w_bits: ArrayLike,
                 a_bits: ArrayLike) -> dict[str, Array]:
    """Looks up each layer's entry; bits outside 1..8 are clipped (32 -> 8)."""
    if len(layers) != self.table.shape[0]:
      raise ValueError(f"{self.name} has {self.table.shape[0]} layers; the "
                       f"network has {len(layers)}")
    w = effective_bits(w_bits).astype(jnp.int32) - 1
    a = effective_bits(a_bits).astype(jnp.int32) - 1
    w, a, idx = jnp.broadcast_arrays(w, a, jnp.arange(len(layers)))
    values = jnp.asarray(self.table, jnp.float32)[idx, w, a]
    if self.unit == "energy_j":
      return {"energy_j": values}
    return {"cycles": values, "compute_cycles": values,
            "stall_cycles": jnp.zeros_like(values), "latency_s": values / self.clock_hz}
