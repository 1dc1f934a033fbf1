"""Bit Fusion: an array of fusion units of 2-bit BitBricks (ISCA 2018).

A fusion unit holds sixteen 2-bit BitBricks that fuse into one 8x8-bit
multiplier, or into `pf(w, a) = floor(8 / max(a, 2)) * floor(8 / max(w, 2))`
narrower multipliers working in parallel (16 at 2x2 bits, 4 at 4x4, 1 at
8x8). The `N x M` array (rows share inputs, columns produce output channels)
runs a convolution in

    compute = B * ceil(OC / M) * Ho * Wo * R * S * ceil(IC / (N * pf))

cycles; the first layer (three input channels) is mapped with im2col, so its
`R * S * IC` reduction is split over the rows together:
`B * ceil(OC / M) * Ho * Wo * ceil(R * S * IC / (N * pf))`. A layer with `G`
groups (depthwise: `C`) runs `G` such convolutions, which leaves most of the
array idle, as it would on the real design.

Off-chip traffic is proportional to the bits: weights at `w`, inputs at `a`
(re-read once per weight tile when the weights exceed the weight buffer),
outputs at `output_bits`. The interface moves `interface_bits` per cycle;
a memory-bound layer stalls: `cycles = max(compute, traffic / interface)`,
its stall cycles being the transfer's cycles beyond compute. Energy is
compute (a core energy per active cycle), SRAM (the on-chip buffer accesses of
an active cycle, input buffer: N*8 bits, weight buffer: N*M*8 bits, output
buffer: M 32-bit partial sums read and written, at an SRAM energy per bit) and
DRAM (energy per bit).

That is the 'stream' memory model. With `memory='tiled'` (the default) the
memory side is the Bit Fusion simulator's own: its loop tiling and loop-order search over the
three buffers, per-operand DRAM traffic, stall cycles and per-access energies
(`haqjax.hardware.bitfusion_memory`), which reproduces the simulator's cycles
and energy on ResNet-18, ResNet-20 and MobileNetV2 layers.

Floating-point bit-widths (32) run as 8 bits.

References:
  H. Sharma et al., "Bit Fusion: Bit-Level Dynamically Composable Architecture
  for Accelerating Deep Neural Networks", ISCA 2018.
  M. Horowitz, "Computing's energy problem", ISSCC 2014.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from haqjax.hardware import base
from haqjax.hardware import bitfusion_memory
from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import ceil_div
from haqjax.hardware.layers import effective_bits
from haqjax.hardware.systolic import fused_products
from haqjax.typing import Array, ArrayLike

# Memory models: the streaming estimate above, or the simulator's tiled loop
# nest (haqjax.hardware.bitfusion_memory).
MEMORY_MODELS = ("stream", "tiled")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitFusion:
  """A Bit Fusion instance. Defaults: the paper's Eyeriss-comparison point.

  That point (Sharma et al., Sec. 6) is 16 x 32 fusion units (512 units,
  8192 BitBricks) at 500 MHz in 45 nm, a 192-bit off-chip interface, 64 KiB
  weight, 32 KiB input and 16 KiB output buffers, and 15 pJ per DRAM bit.

  Attributes:
    name: label for reports.
    rows: N, fusion-unit rows (share an input, split the reduction).
    cols: M, fusion-unit columns (one output channel each).
    clock_hz: clock.
    batch: default batch size.
    interface_bits: off-chip bits per cycle.
    wbuf_bytes, ibuf_bytes, obuf_bytes: on-chip buffers.
    output_bits: bits of a written output activation.
    core_pj_per_cycle: core energy of an active cycle (an assumption of
      ~0.5 W at 500 MHz for the 512-unit array; the paper reports energy
      relative to Eyeriss, not in joules per cycle).
    sram_pj_per_bit: buffer access energy (Horowitz: 20 pJ per 64-bit read
      of a 32 KB SRAM).
    dram_pj_per_bit: off-chip energy per bit (15 pJ, as in the paper).
    memory: 'tiled' (the simulator's tiled loop nest, the default;
      `core_pj_per_cycle`, `sram_pj_per_bit` and `output_bits` give way to
      `buffer_energy` and 32-bit partial sums) or 'stream' (the module
      docstring's estimate).
    buffer_energy: the simulator's per-cycle and per-bit buffer energies, for
      'tiled'.
  """
  name: str = "bitfusion"
  rows: int = 16
  cols: int = 32
  clock_hz: float = 500e6
  batch: int = 16
  interface_bits: float = 192.0
  wbuf_bytes: int = 64 * 1024
  ibuf_bytes: int = 32 * 1024
  obuf_bytes: int = 16 * 1024
  output_bits: int = 8
  core_pj_per_cycle: float = 1000.0
  sram_pj_per_bit: float = 20.0 / 64
  dram_pj_per_bit: float = 15.0
  memory: str = "tiled"
  buffer_energy: bitfusion_memory.BufferEnergy = bitfusion_memory.SIMULATOR_ENERGY

  def __post_init__(self):
    base.check_int(self, "rows", "cols", "batch", "wbuf_bytes", "ibuf_bytes",
                   "obuf_bytes", "output_bits")
    base.check_positive(self, "clock_hz", "interface_bits", "core_pj_per_cycle",
                        "sram_pj_per_bit", "dram_pj_per_bit")
    base.check_choice(self, "memory", MEMORY_MODELS)

  def compute_cycles(self, layers: Layers, w_bits: ArrayLike,
                     a_bits: ArrayLike) -> Array:
    """Stall-free compute cycles per layer (the formula of the docstring)."""
    pf = fused_products(w_bits, a_bits)
    lanes = self.rows * pf
    in_ch = layers.k / layers.kernel_size                       # per group
    direct = layers.kernel_size * ceil_div(in_ch, lanes)
    im2col = ceil_div(layers.k, lanes)
    reduction = jnp.where(layers.first > 0, im2col, direct)
    return layers.groups * layers.m * ceil_div(layers.n, self.cols) * reduction

  def layer_cost(self, layers: Layers, w_bits: ArrayLike,
                 a_bits: ArrayLike) -> dict[str, Array]:
    """Per-layer cycles, latency, energy, DRAM bytes and utilization."""
    if self.memory == "tiled":
      return bitfusion_memory.tiled_cost(self, layers, w_bits, a_bits)
    w = effective_bits(w_bits)
    a = effective_bits(a_bits)
    compute = self.compute_cycles(layers, w, a)
    weight_bits = layers.rhs_elems * w
    weight_tiles = ceil_div(weight_bits, 8.0 * self.wbuf_bytes)
    dram_bits = (weight_bits + layers.in_elems * a * weight_tiles
                 + layers.out_elems * self.output_bits)
    cycles = jnp.maximum(compute, dram_bits / self.interface_bits)
    sram_bits_per_cycle = (self.rows * 8 + self.rows * self.cols * 8
                           + self.cols * 32 * 2)
    sram_pj_per_cycle = sram_bits_per_cycle * self.sram_pj_per_bit
    dram_pj = dram_bits * self.dram_pj_per_bit
    energy_pj = compute * (self.core_pj_per_cycle + sram_pj_per_cycle) + dram_pj
    peak = self.rows * self.cols * fused_products(w, a)
    return {
        "cycles": cycles,
        "compute_cycles": compute,
        "stall_cycles": cycles - compute,
        "latency_s": cycles / self.clock_hz,
        "energy_j": energy_pj * 1e-12,
        "compute_energy_j": compute * self.core_pj_per_cycle * 1e-12,
        "sram_energy_j": compute * sram_pj_per_cycle * 1e-12,
        "dram_energy_j": dram_pj * 1e-12,
        "dram_bytes": dram_bits / 8.0,
        "utilization": layers.macs / (peak * cycles),
    }


BITFUSION = BitFusion()
