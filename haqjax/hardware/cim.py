"""A compute-in-memory accelerator of crossbars, as DNN+NeuroSim models it.

Weights sit in `R x C` crossbars (subarrays) of memory cells holding
`cell_bits` bits each; a w-bit weight is sliced over `s = ceil(w / cell_bits)`
adjacent columns. Inputs enter bit-serially, `dac_bits` bits per input cycle
(`ceil(a / dac_bits)` cycles); in each, every driven row adds its cells'
currents onto the columns, and ADCs of `adc_bits` bits, each shared by
`cols_per_adc` adjacent columns through a column mux, convert the column sums
one mux position at a time. Shift-adders combine the slices, the input cycles
and the crossbars a reduction is split over.

Mapping: a layer's per-group GEMM `[M, K] x [K, N]` is unrolled to a weight
matrix of `K` rows and `N * s` columns, tiled onto
`ceil(K / R) * ceil(N * s / C)` crossbars per group. A depthwise layer (`C_in`
groups of `K = kh * kw`, `N = 1`) is mapped block-diagonally: each channel's
`kh * kw` weights get their own rows and one column group of `s` columns, and
`p = min(floor(R / K), floor(C / s))` channels share a crossbar, so most of its
cells stay empty (`utilization` reports the filled fraction).

Timing (parallelism assumption): the whole network is mapped on chip, as
NeuroSim maps every layer to its own tiles, and all crossbars of a layer work
in parallel on one output pixel at a time. A pixel takes
`input cycles * mux cycles` sense cycles, the mux cycles being
`min(cols_per_adc, columns used in a crossbar)`, so

    compute_cycles = M * ceil(a / dac_bits) * min(cols_per_adc, used columns)

with `M = batch * out_h * out_w`. Weight bits cost crossbars (area, energy),
hardly cycles: in this model latency follows the activation bits. The layer
reads its input feature map and writes its output over a DRAM port of
`dram_bytes_per_cycle`; a layer stalls for the transfer's cycles beyond
compute (weights are programmed once, not moved per inference).

Energy, in three parts as the other targets split it:
  * compute: cell reads (every weight cell, once per input cycle and output
    pixel), DAC row drives (every row of every column tile, per input cycle
    and pixel), ADC conversions (every used column of every row tile, per
    input cycle and pixel) at `adc_fj_per_level * (2**adc_bits - 1)` each,
    and one shift-add per conversion;
  * sram: the im2col inputs read from the buffer at `a` bits per output pixel
    (broadcast to the column tiles) and the outputs written at `output_bits`;
  * dram: the input feature map read at `a` bits, outputs at `output_bits`.
At the defaults the DRAM part dominates (MobileNetV2, 224, batch 1, W8A8:
4.5 mJ, of which 94 uJ compute and 77 uJ buffer); a budget on the
in-memory computation alone is a 'compute_energy' budget.

Area (`area_mm2`, a per-layer extra cost): the layer's crossbars' cells and
ADCs, `ceil(C / cols_per_adc)` per crossbar at an area growing with the ADC's
`2**adc_bits - 1` levels, as NeuroSim's multilevel sense amplifier's.

Defaults (NeuroSim V1.3 `Param.cpp`: RRAM 1T1R, 22 nm, LSTP): 128 x 128
subarrays, 2-bit cells, 8 columns per ADC, 5-bit ADC (32 levels), 1-bit
input per cycle, 1 GHz, 1 ns sensing. Per-op energies:
  * ADC: NeuroSim's current-mode multilevel sense amplifier at 22 nm LSTP
    draws 1.7 uW per reference level (`MultilevelSenseAmp.cpp`), over 1 ns:
    1.7 fJ per level, 52.7 fJ per 5-bit conversion.
  * cell read: its column current-to-voltage power is `0.0631 / R_column` W
    (same file); at the mean conductance of a cell with `R_on = 6 kOhm`,
    `R_off = 150 R_on` (8.39e-5 S) over 1 ns: 5.3 fJ per cell read.
  * DAC (a row driver for 1 bit): an estimate, a ~20 fF wordline at the
    1.1 V access voltage: 24 fJ; a d-bit DAC costs `2**d - 1` times that.
  * shift-add: a 32-bit add, 0.1 pJ (Horowitz, 45 nm; pessimistic at 22 nm).
  * SRAM buffer 2.5 pJ/byte, DRAM 325 pJ/byte (Horowitz, as
    `haqjax.hardware.energy`).
Areas: a 1T1R cell of 4F x 12F at F = 40 nm (`Param.cpp`), 0.0768 um^2; an
ADC 4.7 um^2 per level (an estimate: ISAAC's 8-bit ADC, 1200 um^2 / 255).

Floating-point bit-widths (32) run as 8 bits.

References:
  X. Peng, S. Huang, Y. Luo, X. Sun, S. Yu, "DNN+NeuroSim: An End-to-End
  Benchmarking Framework for Compute-in-Memory Accelerators with Versatile
  Device Technologies", IEDM 2019.
  X. Peng, S. Huang, H. Jiang, A. Lu, S. Yu, "DNN+NeuroSim V2.0: An End-to-End
  Benchmarking Framework for Compute-in-Memory Accelerators for On-Chip
  Training", IEEE TCAD 2021 (arXiv 2020).
  A. Shafiee et al., "ISAAC: A Convolutional Neural Network Accelerator with
  In-Situ Analog Arithmetic in Crossbars", ISCA 2016.
  M. Horowitz, "Computing's energy problem", ISSCC 2014.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from haqjax.hardware import base
from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import ceil_div
from haqjax.hardware.layers import effective_bits
from haqjax.typing import Array, ArrayLike

# Fields that the CLI sets with --FIELD=VALUE (rows and cols: --array=RxC).
FLAG_FIELDS = ("cell_bits", "dac_bits", "adc_bits", "cols_per_adc", "clock_hz",
               "dram_bytes_per_cycle", "output_bits", "cell_read_fj",
               "dac_fj_per_level", "adc_fj_per_level", "shift_add_pj",
               "sram_pj_per_byte", "dram_pj_per_byte", "cell_um2",
               "adc_um2_per_level")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cim:
  """A compute-in-memory accelerator. Defaults: NeuroSim V1.3's RRAM design.

  Attributes:
    name: label for reports.
    rows, cols: R x C cells per crossbar (subarray).
    cell_bits: bits stored per cell; a w-bit weight takes ceil(w/cell_bits)
      columns.
    dac_bits: input bits applied per input cycle.
    adc_bits: ADC resolution.
    cols_per_adc: columns sharing one ADC through the column mux.
    clock_hz: sense cycles per second.
    batch: default batch size.
    dram_bytes_per_cycle: off-chip bandwidth.
    output_bits: bits of a written output activation.
    cell_read_fj: energy of one cell read (one input cycle).
    dac_fj_per_level: energy of a row drive per DAC level (2**dac_bits - 1).
    adc_fj_per_level: ADC energy per conversion per level (2**adc_bits - 1).
    shift_add_pj: one shift-add of an ADC output.
    sram_pj_per_byte: on-chip buffer access energy.
    dram_pj_per_byte: off-chip access energy.
    cell_um2: area of one cell.
    adc_um2_per_level: ADC area per level.
  """
  name: str = "cim"
  rows: int = 128
  cols: int = 128
  cell_bits: int = 2
  dac_bits: int = 1
  adc_bits: int = 5
  cols_per_adc: int = 8
  clock_hz: float = 1e9
  batch: int = 1
  dram_bytes_per_cycle: float = 32.0
  output_bits: int = 8
  cell_read_fj: float = 5.3
  dac_fj_per_level: float = 24.0
  adc_fj_per_level: float = 1.7
  shift_add_pj: float = 0.1
  sram_pj_per_byte: float = 20.0 / 8
  dram_pj_per_byte: float = 2600.0 / 8
  cell_um2: float = 0.0768
  adc_um2_per_level: float = 4.7

  def __post_init__(self):
    base.check_int(self, "rows", "cols", "cell_bits", "dac_bits", "adc_bits",
                   "cols_per_adc", "batch", "output_bits")
    base.check_positive(self, "clock_hz", "dram_bytes_per_cycle", "cell_read_fj",
                        "dac_fj_per_level", "adc_fj_per_level", "shift_add_pj",
                        "sram_pj_per_byte", "dram_pj_per_byte", "cell_um2",
                        "adc_um2_per_level")
    if self.cols_per_adc > self.cols:
      raise ValueError(f"Cim.cols_per_adc is {self.cols_per_adc}; allowed: at most "
                       f"cols ({self.cols})")

  @property
  def adc_pj(self) -> float:
    """Energy of one ADC conversion."""
    return self.adc_fj_per_level * (2 ** self.adc_bits - 1) * 1e-3

  @property
  def dac_pj(self) -> float:
    """Energy of one row drive (one input cycle of one row)."""
    return self.dac_fj_per_level * (2 ** self.dac_bits - 1) * 1e-3

  @property
  def adcs_per_crossbar(self) -> int:
    return -(-self.cols // self.cols_per_adc)

  def mapping(self, layers: Layers, w_bits: ArrayLike) -> dict[str, Array]:
    """How each layer's weights tile onto crossbars, `[..., L]`.

    Returns:
      `slices` (columns per weight), `row_tiles` and `col_tiles` (crossbars a
      group's reduction and columns span; for a depthwise layer, per packed
      crossbar), `crossbars` (all of the layer's), `used_cols` (columns in use
      in the fullest crossbar).
    """
    s = jnp.ceil(effective_bits(w_bits) / self.cell_bits)
    dw = layers.depthwise > 0
    row_tiles = ceil_div(layers.k, self.rows)
    col_tiles = ceil_div(layers.n * s, self.cols)
    dense = layers.groups * row_tiles * col_tiles
    # Depthwise: p channels on one crossbar's diagonal, each K rows, s columns.
    per_xbar = jnp.maximum(1.0, jnp.minimum(jnp.floor(self.rows / layers.k),
                                            jnp.floor(self.cols / s)))
    packed = ceil_div(layers.groups, per_xbar) * row_tiles * col_tiles
    crossbars = jnp.where(dw, packed, dense)
    used = jnp.where(dw, jnp.minimum(per_xbar * s, self.cols),
                     jnp.minimum(layers.n * s, self.cols))
    return {"slices": s, "row_tiles": row_tiles, "col_tiles": col_tiles,
            "crossbars": crossbars, "used_cols": used}

  def area_mm2(self, crossbars: ArrayLike) -> Array:
    """Cells plus ADCs of `crossbars` crossbars, in mm^2."""
    per_xbar_um2 = (self.rows * self.cols * self.cell_um2
                    + self.adcs_per_crossbar * self.adc_um2_per_level
                    * (2 ** self.adc_bits - 1))
    return jnp.asarray(crossbars, jnp.float32) * per_xbar_um2 * 1e-6

  def layer_cost(self, layers: Layers, w_bits: ArrayLike,
                 a_bits: ArrayLike) -> dict[str, Array]:
    """Per-layer cycles (compute, stall), latency, energy (compute, SRAM,
    DRAM), DRAM bytes, cell utilization, crossbars and area."""
    w = effective_bits(w_bits)
    a = effective_bits(a_bits)
    mp = self.mapping(layers, w)
    s = mp["slices"]
    in_cycles = jnp.ceil(a / self.dac_bits)
    mux = jnp.minimum(float(self.cols_per_adc), mp["used_cols"])
    compute = layers.m * in_cycles * mux
    dram_bits = layers.in_elems * a + layers.out_elems * self.output_bits
    dram_bytes = dram_bits / 8.0
    cycles = jnp.maximum(compute, dram_bytes / self.dram_bytes_per_cycle)
    # Per output pixel and input cycle: [..., L] counts over all groups.
    pixel_cycles = layers.m * in_cycles
    cell_reads = layers.macs * s * in_cycles
    row_drives = pixel_cycles * layers.groups * layers.k * mp["col_tiles"]
    conversions = pixel_cycles * layers.groups * mp["row_tiles"] * layers.n * s
    compute_pj = (cell_reads * self.cell_read_fj * 1e-3 + row_drives * self.dac_pj
                  + conversions * (self.adc_pj + self.shift_add_pj))
    sram_bits = (layers.groups * layers.m * layers.k * a
                 + layers.out_elems * self.output_bits)
    sram_pj = sram_bits / 8.0 * self.sram_pj_per_byte
    dram_pj = dram_bytes * self.dram_pj_per_byte
    shape = jnp.broadcast_shapes(w.shape, a.shape, layers.m.shape)
    full = lambda x: jnp.broadcast_to(x, shape)
    filled = layers.weights * s / (mp["crossbars"] * self.rows * self.cols)
    return {
        "cycles": cycles,
        "compute_cycles": compute,
        "stall_cycles": cycles - compute,
        "latency_s": cycles / self.clock_hz,
        "energy_j": (compute_pj + sram_pj + dram_pj) * 1e-12,
        "compute_energy_j": compute_pj * 1e-12,
        "sram_energy_j": sram_pj * 1e-12,
        "dram_energy_j": dram_pj * 1e-12,
        "dram_bytes": dram_bytes,
        "utilization": full(filled),
        "crossbars": full(mp["crossbars"]),
        "area_mm2": full(self.area_mm2(mp["crossbars"])),
    }


# NeuroSim V1.3's default RRAM design (module docstring), batch 1.
CIM = Cim()
