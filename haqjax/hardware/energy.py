"""Energy per operation and per byte moved, 45 nm (Horowitz, ISSCC 2014).

The table is the one of "Computing's energy problem (and what we can do about
it)": integer and floating-point add/multiply energies at 45 nm, 0.9 V, and
the cost of reading 64 bits from an SRAM of a given size or from DRAM. Integer
multiplier energy grows roughly with the product of the operand widths and an
adder's with its width, which is how `mac_pj` scales the 8-bit numbers to
other bit-widths.

References:
  M. Horowitz, "Computing's energy problem (and what we can do about it)",
  ISSCC 2014.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from haqjax.hardware import base
from haqjax.typing import Array, ArrayLike


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnergyTable:
  """Energies in picojoules (defaults: Horowitz 2014, 45 nm).

  Attributes:
    int8_mult_pj: 8-bit integer multiply (0.2 pJ).
    int8_add_pj: 8-bit integer add (0.03 pJ).
    int32_add_pj: 32-bit integer add, the accumulator (0.1 pJ).
    int32_mult_pj: 32-bit integer multiply (3.1 pJ).
    fp32_mult_pj: 32-bit float multiply (3.7 pJ).
    fp32_add_pj: 32-bit float add (0.9 pJ).
    sram_pj_per_byte: 64-bit read of a 32 KB SRAM, 20 pJ, per byte (2.5).
    dram_pj_per_byte: 64-bit DRAM access, 1.3-2.6 nJ, per byte (upper end, 325).
  """
  int8_mult_pj: float = 0.2
  int8_add_pj: float = 0.03
  int32_add_pj: float = 0.1
  int32_mult_pj: float = 3.1
  fp32_mult_pj: float = 3.7
  fp32_add_pj: float = 0.9
  sram_pj_per_byte: float = 20.0 / 8
  dram_pj_per_byte: float = 2600.0 / 8

  def __post_init__(self):
    base.check_positive(self, *(f.name for f in dataclasses.fields(self)))

  def mac_pj(self, w_bits: ArrayLike, a_bits: ArrayLike) -> Array:
    """Energy of one integer multiply-accumulate of w x a bits into 32 bits.

    The multiply scales with `w * a / 64` from the 8-bit figure; the 32-bit
    accumulation is fixed.
    """
    w = jnp.asarray(w_bits, jnp.float32)
    a = jnp.asarray(a_bits, jnp.float32)
    return self.int8_mult_pj * w * a / 64.0 + self.int32_add_pj

  def fp32_mac_pj(self) -> float:
    """Energy of one 32-bit floating-point multiply-accumulate."""
    return self.fp32_mult_pj + self.fp32_add_pj


HOROWITZ_45NM = EnergyTable()
