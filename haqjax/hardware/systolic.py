"""A TPU-like systolic array with SCALE-Sim's stall-free timing.

An `R x C` array of PEs runs each GEMM `[M, K] x [K, N]` in folds. Per
dataflow (SCALE-Sim's mapping: spatial rows `Sr`, spatial columns `Sc`,
temporal length `T`):

  * output stationary ('os'): `Sr = M`, `Sc = N`, `T = K`;
  * weight stationary ('ws'): `Sr = K`, `Sc = N`, `T = M`;
  * input stationary ('is'):  `Sr = K`, `Sc = M`, `T = N`.

The array runs `ceil(Sr / R) * ceil(Sc / C)` folds; each fold streams `T`
operands plus the skew that fills and drains the array, which SCALE-Sim v2
counts as `T + R + C - 2` cycles for 'os' and `T + 2R + C - 2` for 'ws' and
'is' (the stationary operand is loaded first). A layer with `G` groups (a
depthwise conv: `C` channels) runs `G` such GEMMs, as SCALE-Sim runs a `DP`
layer one channel at a time. These stall-free cycles equal the `scalesim`
package's compute model exactly (tests/hardware_systolic_test.py).

Bit-widths (`bit_mode`), a documented choice:
  * 'parallel': 8-bit PEs; fewer bits save energy and traffic, not cycles.
  * 'stripes': bit-serial activations (Judd et al., MICRO 2016): the temporal
    stream is `a` times longer.
  * 'loom': bit-serial weights and activations (Sharify et al., DAC 2018): the
    temporal stream is `w * a` times longer.
  * 'fused': Bit-Fusion-like PEs doing `floor(8/max(a,2)) * floor(8/max(w,2))`
    products per cycle: the temporal stream is that many times shorter.
The serial/fused factor multiplies `T`, not the fill and drain.

Memory (`bandwidth_mode`):
  * 'roofline' (the preset's default): each operand is read once when it fits
    its SRAM, else once per fold of the other operand; outputs are written
    once at `output_bits`; `cycles = max(compute, DRAM bytes / bytes per
    cycle)`. A bound, several times SCALE-Sim's cycles for weight-stationary
    layers.
  * 'user': SCALE-Sim's double-buffered scratchpads at a given bandwidth
    (its `InterfaceBandwidth: USER`), followed fold by fold by
    `haqjax.hardware.systolic_memory`: stall cycles and the ifmap, filter and
    ofmap DRAM traffic (`*_dram_bytes`).
  * 'calc': SCALE-Sim's `InterfaceBandwidth: CALC`: no stalls; the same
    traffic, and `dram_bytes_per_cycle_needed`, its bytes over the compute
    cycles.
A config file of SCALE-Sim sets all of these (`haqjax.hardware.scale_config`).
Energy uses the 45 nm table of `haqjax.hardware.energy`: compute (a MAC at
the operand widths), SRAM (reads of the operand matrices per fold as
SCALE-Sim counts them) and DRAM bytes.

References:
  A. Samajdar et al., "A Systematic Methodology for Characterizing
  Scalability of DNN Accelerators using SCALE-Sim", ISPASS 2020.
  N. Jouppi et al., "In-Datacenter Performance Analysis of a Tensor Processing
  Unit", ISCA 2017.
  M. Horowitz, "Computing's energy problem", ISSCC 2014.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from haqjax.hardware import base
from haqjax.hardware import energy as energy_lib
from haqjax.hardware import systolic_memory
from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import ceil_div
from haqjax.hardware.layers import effective_bits
from haqjax.typing import Array, ArrayLike

DATAFLOWS = ("os", "ws", "is")
BIT_MODES = ("parallel", "stripes", "loom", "fused")
BANDWIDTH_MODES = ("roofline", "user", "calc")


def fused_products(w_bits: Array, a_bits: Array) -> Array:
  """Products per cycle of a Bit Fusion unit: floor(8/max(a,2))*floor(8/max(w,2))."""
  w = jnp.maximum(effective_bits(w_bits), 2.0)
  a = jnp.maximum(effective_bits(a_bits), 2.0)
  return jnp.floor(8.0 / a) * jnp.floor(8.0 / w)


def fold_cycles(dataflow: str, rows: int, cols: int, m: Array, n: Array,
                k: Array, stream: Array | float = 1.0) -> tuple[Array, Array]:
  """SCALE-Sim's stall-free cycles of one GEMM, and its number of folds.

  Args:
    dataflow: 'os', 'ws' or 'is'.
    rows, cols: array size.
    m, n, k: GEMM sizes (arrays, whole numbers).
    stream: factor on the temporal length (bit-serial modes); 1 in SCALE-Sim.

  Returns:
    `(cycles, folds)`.
  """
  if dataflow == "os":
    sr, sc, t, fill = m, n, k, rows + cols - 2
  elif dataflow == "ws":
    sr, sc, t, fill = k, n, m, 2 * rows + cols - 2
  elif dataflow == "is":
    sr, sc, t, fill = k, m, n, 2 * rows + cols - 2
  else:
    raise ValueError(f"dataflow is {dataflow!r}; allowed: {', '.join(DATAFLOWS)}")
  folds = ceil_div(sr, rows) * ceil_div(sc, cols)
  return folds * (jnp.ceil(t * stream) + fill), folds


@dataclasses.dataclass(frozen=True, kw_only=True)
class Systolic:
  """A systolic-array accelerator. Defaults: a 32x32 TPU-like int8 array.

  Attributes:
    name: label for reports.
    rows, cols: PE array size.
    dataflow: 'os', 'ws' or 'is'.
    bit_mode: 'parallel', 'stripes', 'loom' or 'fused' (module docstring).
    clock_hz: clock.
    batch: default batch size.
    ifmap_sram_bytes, filter_sram_bytes, ofmap_sram_bytes: SRAMs (the
      'roofline' mode reads the first two only: an operand "fits" when it is
      at most this size; 'user' and 'calc' double-buffer all three).
    bandwidth_mode: 'roofline', 'user' or 'calc' (module docstring).
    dram_bytes_per_cycle: off-chip bandwidth (SCALE-Sim's `Bandwidth`, the
      ofmap buffer's in 'user' mode).
    ifmap_bytes_per_cycle, filter_bytes_per_cycle: the read buffers' own
      bandwidths in 'user' mode (SCALE-Sim v3's `[layout]` bank bandwidths);
      None: `dram_bytes_per_cycle`.
    output_bits: bits of a written output activation.
    energy: per-op and per-byte energies (45 nm, Horowitz).
  """
  name: str = "systolic"
  rows: int = 32
  cols: int = 32
  dataflow: str = "os"
  bit_mode: str = "parallel"
  clock_hz: float = 1e9
  batch: int = 1
  ifmap_sram_bytes: int = 512 * 1024
  filter_sram_bytes: int = 512 * 1024
  ofmap_sram_bytes: int = 512 * 1024
  bandwidth_mode: str = "roofline"
  dram_bytes_per_cycle: float = 32.0
  ifmap_bytes_per_cycle: float | None = None
  filter_bytes_per_cycle: float | None = None
  output_bits: int = 8
  energy: energy_lib.EnergyTable = energy_lib.HOROWITZ_45NM

  def __post_init__(self):
    base.check_int(self, "rows", "cols", "batch", "ifmap_sram_bytes",
                   "filter_sram_bytes", "ofmap_sram_bytes", "output_bits")
    base.check_positive(self, "clock_hz", "dram_bytes_per_cycle")
    for f in ("ifmap_bytes_per_cycle", "filter_bytes_per_cycle"):
      if getattr(self, f) is not None:
        base.check_positive(self, f)
    base.check_choice(self, "dataflow", DATAFLOWS)
    base.check_choice(self, "bit_mode", BIT_MODES)
    base.check_choice(self, "bandwidth_mode", BANDWIDTH_MODES)

  def stream_factor(self, w_bits: ArrayLike, a_bits: ArrayLike) -> Array:
    """Cycles per temporal step relative to 8-bit parallel PEs."""
    w = effective_bits(w_bits)
    a = effective_bits(a_bits)
    if self.bit_mode == "parallel":
      return jnp.ones_like(w * a)
    if self.bit_mode == "stripes":
      return a * jnp.ones_like(w)
    if self.bit_mode == "loom":
      return w * a
    return 1.0 / fused_products(w, a)

  def _own_stream(self, w: Array, a: Array) -> Array | float:
    """`stream_factor` on the bits it depends on only (1.0: none)."""
    if self.bit_mode == "parallel":
      return 1.0
    if self.bit_mode == "stripes":
      return a
    if self.bit_mode == "loom":
      return w * a
    return 1.0 / fused_products(w, a)

  def layer_cost(self, layers: Layers, w_bits: ArrayLike,
                 a_bits: ArrayLike) -> dict[str, Array]:
    """Per-layer cycles, latency, DRAM bytes, utilization and energy."""
    w = effective_bits(w_bits)
    a = effective_bits(a_bits)
    stream = self.stream_factor(w, a)
    per_gemm, folds = fold_cycles(self.dataflow, self.rows, self.cols,
                                  layers.m, layers.n, layers.k, stream)
    compute = layers.groups * per_gemm
    # Folds along the other operand's dimension: how often each is re-read.
    row_folds = ceil_div(layers.m, self.rows)
    col_folds = ceil_div(layers.n, self.cols)
    extra = {}
    if self.bandwidth_mode == "roofline":
      in_bits = layers.in_elems * a
      w_bits_total = layers.rhs_elems * w
      in_fits = in_bits <= 8.0 * self.ifmap_sram_bytes
      w_fits = w_bits_total <= 8.0 * self.filter_sram_bytes
      in_reloads = jnp.where(in_fits | (self.dataflow == "is"), 1.0, col_folds)
      w_reloads = jnp.where(w_fits | (self.dataflow == "ws"), 1.0, row_folds)
      dram_bits = (in_bits * in_reloads + w_bits_total * w_reloads
                   + layers.out_elems * self.output_bits)
      dram_bytes = dram_bits / 8.0
      cycles = jnp.maximum(compute, dram_bytes / self.dram_bytes_per_cycle)
    else:
      # The buffers' walks run on the shapes their inputs have (the ifmap's
      # on the activation bits, the filter's on the weight bits), not on
      # every (w, a) pair, then broadcast.
      own, _ = fold_cycles(self.dataflow, self.rows, self.cols, layers.m, layers.n,
                           layers.k, self._own_stream(w, a))
      full = jnp.shape(per_gemm * layers.groups)
      extra = {name: jnp.broadcast_to(v, full)
               for name, v in self.scratchpad_cost(layers, w, a, own).items()}
      dram_bytes = sum(extra[f"{x}_dram_bytes"] for x in ("ifmap", "filter", "ofmap"))
      cycles = compute + extra.pop("stall_cycles")
      if self.bandwidth_mode == "calc":
        cycles = compute
        extra["dram_bytes_per_cycle_needed"] = dram_bytes / compute
    # SRAM reads of the operand matrices, as SCALE-Sim counts them per fold.
    sram_bits = layers.groups * (layers.m * layers.k * a * col_folds
                                 + layers.k * layers.n * w * row_folds
                                 + layers.m * layers.n * 32.0)
    e = self.energy
    compute_pj = layers.macs * e.mac_pj(w, a)
    sram_pj = sram_bits / 8.0 * e.sram_pj_per_byte
    dram_pj = dram_bytes * e.dram_pj_per_byte
    energy_pj = compute_pj + sram_pj + dram_pj
    del folds
    return {
        "cycles": cycles,
        "compute_cycles": compute,
        "stall_cycles": cycles - compute,
        "latency_s": cycles / self.clock_hz,
        "energy_j": energy_pj * 1e-12,
        "compute_energy_j": compute_pj * 1e-12,
        "sram_energy_j": sram_pj * 1e-12,
        "dram_energy_j": dram_pj * 1e-12,
        "dram_bytes": dram_bytes,
        "utilization": layers.macs * stream / (self.rows * self.cols * cycles),
        **extra,
    }

  def scratchpad_cost(self, layers: Layers, w: Array, a: Array,
                      per_gemm: Array) -> dict[str, Array]:
    """Stall cycles and per-operand DRAM bytes on SCALE-Sim's scratchpads.

    Words carry the operand's bits (ifmap `a`, filter `w`, ofmap
    `output_bits`): an SRAM of `B` bytes holds `8 B / bits` words, a port of
    `b` bytes per cycle moves `8 b / bits` words per cycle. A layer of `G`
    groups runs its `G` GEMMs one after the other, as SCALE-Sim runs a `DP`
    layer's channels as layers.
    """
    bits = {"ifmap": a, "filter": w, "ofmap": jnp.float32(self.output_bits)}
    sram = {"ifmap": self.ifmap_sram_bytes, "filter": self.filter_sram_bytes,
            "ofmap": self.ofmap_sram_bytes}
    port = {"ifmap": self.ifmap_bytes_per_cycle, "filter": self.filter_bytes_per_cycle,
            "ofmap": None}
    words = {x: 8.0 * sram[x] / bits[x] for x in bits}
    bw = {x: 8.0 * (port[x] or self.dram_bytes_per_cycle) / bits[x] for x in bits}
    c = systolic_memory.scratchpad_costs(self.dataflow, self.rows, self.cols,
                                         layers.m, layers.n, layers.k, per_gemm,
                                         words, bw, layers.in_elems / layers.groups,
                                         geometry=self.scratchpad_geometry(layers))
    out = {"stall_cycles": layers.groups * c["stall_cycles"]}
    for x in bits:
      out[f"{x}_dram_bytes"] = layers.groups * c[f"{x}_words"] * bits[x] / 8.0
    return out


  def scratchpad_geometry(self, layers: Layers) -> dict[str, Array] | None:
    """`layers.conv_geometry`, or None where no layer's costs depend on it.

    The address walks (an input-stationary ifmap with im2col copies, a
    weight- or output-stationary one whose kernel exceeds its stride) and
    the `-1` words of outputs that read past the input are the geometry's
    only uses (`systolic_memory`); without them the costs are the same
    without it, and a scratchpad model compiled without it takes about half
    the time to compile. Traced layers keep it.
    """
    g = layers.conv_geometry
    if g is None:
      return None
    try:
      v = {name: np.asarray(x) for name, x in g.items()}
      copies = np.asarray(layers.in_elems / layers.groups) < np.asarray(layers.m * layers.k)
    except jax.errors.TracerArrayConversionError:
      return g
    s = np.where(v["stride"] > 0, v["stride"], 1.0)
    gapless = ((v["in_h"] - (v["out_h"] - 1.0) * s >= v["kernel_h"])
               & (v["in_w"] - (v["out_w"] - 1.0) * s >= v["kernel_w"]))
    overlap = (v["kernel_h"] > s) | (v["kernel_w"] > s)
    walk = {"is": copies, "ws": overlap, "os": overlap}[self.dataflow]
    return g if np.any((v["stride"] > 0) & (~gapless | walk)) else None


# A TPU-like 32x32 int8 output-stationary array at 1 GHz, batch 1, 512 KiB
# operand SRAMs and 32 bytes/cycle DRAM (the CLI's --array/--dataflow flags
# override the array; all fields are overridable with dataclasses.replace).
SYSTOLIC = Systolic()
