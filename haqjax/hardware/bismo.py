"""BISMO: a bit-serial matrix-multiply overlay (the accelerator HAQ targets).

BISMO computes a GEMM `[M, K] x [K, N]` of w-bit and a-bit integers as `w * a`
binary GEMMs. Its execute stage is a `Dm x Dn` array of dot-product units, each
ANDing and popcounting two `Dk`-bit rows per cycle, so one layer takes

    execute = ceil(M / Dm) * ceil(N / Dn) * ceil(K / Dk) * w * a    cycles

per GEMM. The fetch stage streams the bit-planes of the operands over the
memory port (rows padded to `Dk` bits), and the result stage writes 32-bit
results. The three stages are decoupled and overlap, so a layer costs the
slowest stage plus a fixed overhead:

    cycles = max(execute, fetch_a * a, fetch_w * w, result) + overhead

Its compute cycles are `execute + overhead` (the fixed overhead, instruction
issue and pipeline fill, is part of the compute schedule, as SCALE-Sim counts
fill and drain), its stall cycles the cycles the slowest stream takes beyond
the execute stage. The model has no energy.

Depthwise convolutions are `C` GEMMs of `[M, R*S] x [R*S, 1]`. With
`pack_depthwise=True` the windows of `Dk / 2**ceil(log2(R*S))` channels share
one `Dk`-bit row (each padded to a power of two, as a segmented popcount would
use them); HAQ's shipped BISMO table is matched this way. With `False` they run
as separate GEMMs.

Floating-point bit-widths (32) run as 8 bits (see `layers.effective_bits`).

References:
  Y. Umuroglu, L. Rasnayake, M. Sjalander, "BISMO: A Scalable Bit-Serial
  Matrix Multiplication Overlay for Reconfigurable Computing", FPL 2018.
  K. Wang, Z. Liu, Y. Lin, J. Lin, S. Han, "HAQ: Hardware-Aware Automated
  Quantization with Mixed Precision", CVPR 2019.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from haqjax.hardware import base
from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import ceil_div
from haqjax.hardware.layers import effective_bits
from haqjax.typing import Array, ArrayLike


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bismo:
  """A BISMO instance. Defaults: the PYNQ-Z1 (Zynq-7020) instance of the paper.

  Attributes:
    name: label for reports.
    dm: rows of the dot-product-unit array (lhs rows per tile).
    dn: columns of the array (rhs rows per tile).
    dk: bits per dot-product unit per cycle.
    clock_hz: fabric clock.
    batch: default batch size of the preset.
    act_fetch_bits: activation bits the fetch stage reads per cycle.
    weight_fetch_bits: weight bits the fetch stage reads per cycle.
    result_bits: result bits the result stage writes per cycle.
    acc_bits: width of a result (accumulator).
    overhead_cycles: fixed per-layer cost (instruction issue, pipeline fill).
    pack_depthwise: pack several depthwise windows into one Dk-bit row.
  """
  name: str = "bismo-edge"
  dm: int = 8
  dn: int = 8
  dk: int = 256
  clock_hz: float = 200e6
  batch: int = 1
  act_fetch_bits: float = 64.0
  weight_fetch_bits: float = 64.0
  result_bits: float = 64.0
  acc_bits: int = 32
  overhead_cycles: float = 0.0
  pack_depthwise: bool = True

  def __post_init__(self):
    base.check_int(self, "dm", "dn", "dk", "batch", "acc_bits")
    base.check_positive(self, "clock_hz", "act_fetch_bits", "weight_fetch_bits",
                        "result_bits")
    if not isinstance(self.overhead_cycles, (int, float)) or self.overhead_cycles < 0:
      raise ValueError(f"Bismo.overhead_cycles is {self.overhead_cycles!r}; "
                       "allowed: a number >= 0")

  @property
  def peak_binary_ops_per_cycle(self) -> int:
    return self.dm * self.dn * self.dk

  def stages(self, layers: Layers, w_bits: ArrayLike,
             a_bits: ArrayLike) -> dict[str, Array]:
    """Cycles of each stage per layer: execute, fetch_a, fetch_w, result."""
    w = effective_bits(w_bits)
    a = effective_bits(a_bits)
    dw = layers.depthwise > 0
    if self.pack_depthwise:
      per_row = jnp.maximum(
          1.0, self.dk / 2.0 ** jnp.ceil(jnp.log2(layers.kernel_size)))
      gemms = jnp.where(dw, ceil_div(layers.groups, per_row), layers.groups)
      words = jnp.where(dw, 1.0, ceil_div(layers.k, self.dk))
    else:
      gemms = layers.groups
      words = ceil_div(layers.k, self.dk)
    tiles = gemms * ceil_div(layers.m, self.dm) * ceil_div(layers.n, self.dn)
    row_bits = words * self.dk                                 # [L]
    return {
        "execute": tiles * words * w * a,
        "fetch_a": gemms * layers.m * row_bits * a / self.act_fetch_bits,
        "fetch_w": gemms * layers.n * row_bits * w / self.weight_fetch_bits,
        "result": jnp.broadcast_to(
            layers.out_elems * self.acc_bits / self.result_bits,
            jnp.broadcast_shapes(w.shape, a.shape, layers.m.shape)),
    }

  def layer_cost(self, layers: Layers, w_bits: ArrayLike,
                 a_bits: ArrayLike) -> dict[str, Array]:
    """Per-layer cycles (compute, stall), latency, streamed bytes, utilization."""
    s = self.stages(layers, w_bits, a_bits)
    slowest = jnp.maximum(jnp.maximum(s["execute"], s["fetch_a"]),
                          jnp.maximum(s["fetch_w"], s["result"]))
    cycles = slowest + self.overhead_cycles
    streamed_bits = (s["fetch_a"] * self.act_fetch_bits
                     + s["fetch_w"] * self.weight_fetch_bits
                     + s["result"] * self.result_bits)
    useful = layers.macs * effective_bits(w_bits) * effective_bits(a_bits)
    return {
        "cycles": cycles,
        "compute_cycles": s["execute"] + self.overhead_cycles,
        "stall_cycles": slowest - s["execute"],
        "latency_s": cycles / self.clock_hz,
        "dram_bytes": streamed_bits / 8.0,
        "utilization": useful / (self.peak_binary_ops_per_cycle * cycles),
    }


# Zynq-7020 (PYNQ-Z1), batch 1, as HAQ's edge setting. Array 8x256x8 at
# 200 MHz is the PYNQ-Z1 instance of the BISMO paper (6.5 binary TOPS peak);
# the fetch and result streams are one 64-bit AXI HP port each (an assumption:
# the paper's instance uses the Zynq's 64-bit HP ports).
BISMO_EDGE = Bismo(name="bismo-edge")

# VU9P, batch 16, as HAQ's cloud setting. HAQ does not publish this instance;
# the array (Dm=8, Dn=32, Dk=256), the stream widths and the per-layer
# overhead were fitted to the one table HAQ ships (qmobilenetv2_imagenet100_
# batch16_latency_table.npy) with `haqjax.hardware.calibration.fit_bismo`'s
# default grid (power-of-two array sizes, port widths and overheads), minimising
# the mean absolute % error over all 53x8x8 entries plus the worst network-level
# error at uniform W4A4..W8A8. Measured: 8.9% mean absolute error, Spearman
# 0.994, network error -0.8% (W4A4) to -2.3% (W8A8); the classifier layer is
# the worst fit (73.5%, its weight stream is slower in the table than modelled).
# tests/hardware_accelerators_test.py re-checks these numbers against the table
# (test_bismo_cloud_documented_fit) and that the preset is a minimum of the fit.
# Out of sample (`calibration.holdout`, tests/hardware_bismo_holdout_test.py):
# refitted on every other layer, the fit errs 7.7% and 10.4% on the held-out
# half (10.2% and 7.7% on the fitted half) and within 2.4% on the held-out
# network sums; refitted on the first 26 layers it extrapolates poorly to the
# last 27 (3.3% fitted, 14.1% held out, -11.2% on their W8A8 sum).
# The clock (200 MHz) is an assumption; the table is in cycles.
BISMO_CLOUD = Bismo(
    name="bismo-cloud", dm=8, dn=32, dk=256, clock_hz=200e6, batch=16,
    act_fetch_bits=256.0, weight_fetch_bits=16.0, result_bits=4096.0,
    overhead_cycles=2000.0)
