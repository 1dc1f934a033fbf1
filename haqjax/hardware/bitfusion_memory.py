"""Bit Fusion's memory model: tiling, loop order, DRAM traffic, stalls, energy.

The Bit Fusion simulator (Sharma et al., github.com/hsharma35/bitfusion,
`src/optimizer/optimizer.py`) schedules a convolution with `K x K` kernels,
`O x O` outputs, stride `S`, `IC` input and `OC` output channels and batch `B`
as five tile loops, `B/b`, `OW/o`, `OH/o`, `IC/ic` and `OC/oc`, around a tile
that the array computes from its three buffers. Each buffer is double
buffered, so a tile may use half of it:

  * weights (WBUF): `ceil(K*K*ic / P) * P * oc * w` bits, the reduction padded
    to the `P = N * pf(w, a)` lanes of the array's rows;
  * inputs (IBUF): `(K + (o - 1) * S)^2 * ic * b * a` bits (with im2col, the
    network's first layer: `o^2 * K*K * ic * b * a`);
  * partial sums (OBUF): `o^2 * ceil(oc / M) * M * b * 32` bits.

Walking the loops from the innermost out, an operand's footprint grows with
each loop it depends on (weights: IC, OC; inputs: B, OW, OH, IC; partial sums:
B, OW, OH, OC) as long as it fits its half buffer; a loop it does not depend
on re-uses it for free while it fits, and re-fetches it, multiplying its DRAM
traffic by the loop's trip count, once it no longer does. Partial sums are
read from and written back to DRAM, 32 bits each.

Cycles: the tiles' compute cycles (the `BitFusion.compute_cycles` formula per
tile, times the number of tiles), plus stalls: the transfer of the largest
footprints that fit (the first fill, and the last partial sums out) cannot
overlap compute, and the rest of the traffic stalls the array where it needs
more cycles than the compute on the `interface_bits`-wide interface:

  stall = max(0, ceil((traffic - first - last) / W) - compute)
          + ceil(first / W) + ceil(last / W).

Energy: the array's dynamic energy per compute cycle; per-bit buffer energies
for the DRAM fills (buffer writes), the partial sums' round trips, and the
accesses of the inner loops, whose dataflow (input, output or weight
stationary) is the one that moves the fewest bits; DRAM energy per bit.

The simulator tries all 120 loop orders and every power-of-two tile and keeps
the fewest cycles, then the least energy. Here the search runs over 8 loop
orders (`ORDERS`: the fewest that hold the simulator's optimum for every layer
of ResNet-18, ResNet-20 and MobileNetV2 at batch 1 and 16 and bits (w, a) in
{1,2,3,4,5,8} x {1,2,3,4,6,8}) and over the power-of-two tiles that the
partial-sum buffer admits (the output tile is the binding one:
`b * o^2 * oc / M <= OBUF / (2 * 32 * M)`), with the eight largest
input-channel tiles; on those layers it finds the simulator's optimum
(`tests/hardware_bitfusion_memory_test.py` checks every run of
`tests/data/bitfusion_reference.json`). Other shapes can miss it: on 400
random convolutions (kernels 1 to 7, up to 2048 channels, batch up to 32) 9
differed, by at most 2.4% in cycles, and by up to 30% in energy where the
optimum and the schedule found differ by 1e-6 in cycles. The first layer's
output-channel tiles are multiples of `M` as for the other layers (the
simulator also tries narrower ones, which win there only with many input
channels). Cycles within a relative 1e-6 count as equal (float32).

The search depends on the layer shapes and the bits only, so it runs for every
layer at every integer pair `(w, a)` in 1..8 (a `[L, 8, 8]` table, computed
inside the compiled function: bits stay traced data) and the policy's bits,
rounded, select from it.

A grouped convolution (depthwise: `G = C`) has no counterpart in the
simulator; it runs as `G` independent convolutions of `IC / G` input and
`OC / G` output channels, each scheduled as above, as the array would run
them one after the other.

References:
  H. Sharma et al., "Bit Fusion: Bit-Level Dynamically Composable Architecture
  for Accelerating Deep Neural Networks", ISCA 2018.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from haqjax.hardware import base
from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import ceil_div
from haqjax.hardware.layers import effective_bits
from haqjax.hardware.systolic import fused_products
from haqjax.typing import Array, ArrayLike

# Bits of a partial sum in the output buffer and in DRAM.
PSUM_BITS = 32.0
# The five tile loops, and the loops each buffer's footprint depends on
# (weights, inputs, partial sums).
LOOPS = ("b", "ow", "oh", "ic", "oc")
DEPENDS = {"wgt": ("ic", "oc"), "act": ("b", "ow", "oh", "ic"),
           "out": ("b", "ow", "oh", "oc")}
# Loop orders searched, outermost loop first (the simulator's notation).
ORDERS = (("oc", "ic", "ow", "b", "oh"), ("b", "ow", "ic", "oc", "oh"),
          ("ic", "oc", "ow", "oh", "b"), ("b", "oc", "ow", "ic", "oh"),
          ("b", "ow", "oh", "oc", "ic"), ("oc", "b", "ow", "ic", "oh"),
          ("ic", "oc", "b", "ow", "oh"), ("ow", "ic", "oc", "b", "oh"))
# Input-channel tiles searched: the largest power of two >= IC, halved up to
# IC_STEPS - 1 times.
IC_STEPS = 8
# Cycles within this relative difference count as a tie (float32 sums).
TIE_RTOL = 1e-6
# Layers searched together (lax.map over chunks of layers).
CHUNK = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class BufferEnergy:
  """Energies of the simulator's default instance (45 nm, 500 MHz).

  Attributes:
    array_pj_per_cycle: dynamic energy of the 16 x 32 array per compute cycle
      (the simulator's synthesis of a 4 x 4 array, 3.6735 mW at 500 MHz,
      scaled by 512 / 16).
    wbuf_read_pj_per_bit, wbuf_write_pj_per_bit: a weight-buffer bank (128 B,
      32-bit words; CACTI 7, the simulator's `cacti_sweep.csv`).
    ibuf_read_pj_per_bit, ibuf_write_pj_per_bit: an input-buffer bank (2 KiB).
    obuf_read_pj_per_bit, obuf_write_pj_per_bit: an output-buffer bank (512 B,
      read-write port).
  """
  array_pj_per_cycle: float = 235.104
  wbuf_read_pj_per_bit: float = 0.683701 / 32
  wbuf_write_pj_per_bit: float = 0.925317 / 32
  ibuf_read_pj_per_bit: float = 1.90318 / 32
  ibuf_write_pj_per_bit: float = 3.63853 / 32
  obuf_read_pj_per_bit: float = 1.06097 / 32
  obuf_write_pj_per_bit: float = 2.33869 / 32

  def __post_init__(self):
    base.check_positive(self, *(f.name for f in dataclasses.fields(self)))


SIMULATOR_ENERGY = BufferEnergy()


class Geometry(NamedTuple):
  """One group's convolution in the simulator's terms (float arrays)."""
  k: Array          # kernel side K
  o: Array          # output side O
  s: Array          # stride S
  ic: Array         # input channels of a group
  oc: Array         # output channels of a group
  b: Array          # batch B
  im2col: Array     # bool: the network's first layer


def geometry(layers: Layers) -> Geometry:
  """The per-group convolution of each layer; square images and kernels."""
  batch = layers.batch
  out_side = jnp.sqrt(layers.m / batch)
  in_side = jnp.sqrt(layers.in_elems / (batch * layers.in_channels))
  stride = jnp.maximum(jnp.round(in_side / out_side), 1.0)
  return Geometry(k=jnp.sqrt(layers.kernel_size), o=out_side, s=stride,
                  ic=layers.k / layers.kernel_size, oc=layers.n, b=batch,
                  im2col=layers.first > 0)


@functools.lru_cache(maxsize=16)
def candidates(obuf_bits: float, cols: int) -> np.ndarray:
  """Exponents `[T, 4]` of the tiles searched: `(log2 b, log2 o, log2 oc/M, j)`.

  `b * o^2 * oc/M <= R = obuf_bits / (2 * 32 * M)` bounds the output tile;
  each exponent runs up to `ceil(log2 R)` (`o`: half that) and their sum
  `eb + 2 eo + eoc` up to two more, for dimensions smaller than a power of two
  (a 7 x 7 output tile counts as 8 x 8 in the exponents). `j` steps the
  input-channel tile down from the top.
  """
  ratio = obuf_bits / 2.0 / (PSUM_BITS * cols)
  top = max(int(np.ceil(np.log2(ratio))), 0) if ratio >= 1 else 0
  rows = [(eb, eo, eoc, j)
          for eb in range(top + 1) for eo in range((top + 1) // 2 + 1)
          for eoc in range(top + 1) if eb + 2 * eo + eoc <= top + 2
          for j in range(IC_STEPS)]
  return np.asarray(rows, np.int32)


def _ceil_log2(x: Array) -> Array:
  """`ceil(log2 x)` for whole numbers x >= 1, exact (no float log)."""
  mant, expo = jnp.frexp(x)
  return jnp.where(mant == 0.5, expo - 1, expo)


def _tiles(g: Geometry, exps: np.ndarray, cols: int) -> tuple[Array, ...]:
  """Tile sizes `(b, o, ic, oc)` of `g` (broadcast against `exps[:, i]`)."""
  one = jnp.float32(1.0)
  b = jnp.minimum(jnp.ldexp(one, exps[:, 0]), g.b)
  o = jnp.minimum(jnp.ldexp(one, exps[:, 1]), g.o)
  oc = jnp.minimum(jnp.ldexp(one, exps[:, 2]) * cols, g.oc)
  top = _ceil_log2(g.ic)
  ic = jnp.minimum(jnp.ldexp(one, jnp.maximum(top - exps[:, 3], 0)), g.ic)
  return b, o, ic, oc


def _order_free(target, g: Geometry, w: Array, a: Array, b, o, ic, oc) -> dict:
  """What does not depend on the loop order: tiles, trips, compute, inner loops."""
  e = target.buffer_energy
  lanes = target.rows * fused_products(w, a)
  m = float(target.cols)
  kk = g.k * g.k
  trips = {"b": ceil_div(g.b, b), "ow": ceil_div(g.o, o), "oh": ceil_div(g.o, o),
           "ic": ceil_div(g.ic, ic), "oc": ceil_div(g.oc, oc)}
  oc_cols = ceil_div(oc, m)
  halo = g.k + (o - 1.0) * g.s
  tile = {"wgt": ceil_div(kk * ic, lanes) * lanes * oc * w,
          "act": jnp.where(g.im2col, o * o * kk, halo * halo) * ic * b * a,
          "out": o * o * oc_cols * m * b * PSUM_BITS}
  fits = ((tile["wgt"] <= target.wbuf_bytes * 4.0)
          & (tile["act"] <= target.ibuf_bytes * 4.0)
          & (tile["out"] <= target.obuf_bytes * 4.0))
  tiles = trips["b"] * trips["ow"] * trips["oh"] * trips["ic"] * trips["oc"]
  reduction = jnp.where(g.im2col, ceil_div(kk * ic, lanes),
                        kk * ceil_div(ic, lanes))
  compute = tiles * reduction * b * o * o * oc_cols
  # Inner loops: the stationary operand that moves the fewest bits.
  n_is = oc_cols * m
  n_os = jnp.where(g.im2col, ceil_div(kk * ic, lanes),
                   ceil_div(ic, lanes) * kk) * lanes
  n_ws = b * o * o
  cost_is = n_os * n_ws * (a + n_is * (w + PSUM_BITS))
  cost_os = n_is * n_ws * (PSUM_BITS + n_os * (a + w))
  cost_ws = n_os * n_is * (w + n_ws * (a + PSUM_BITS))
  least = jnp.minimum(jnp.minimum(cost_is, cost_os), cost_ws)
  macs = kk * ic * o * o * b * oc
  is_in = cost_is == least
  is_out = ~is_in & (cost_os == least)
  act_reads = a * jnp.where(is_in, macs / oc, macs)
  psums = jnp.where(is_out, o * o * b * oc, macs) * PSUM_BITS
  wgt_reads = jnp.where(is_in | is_out, macs, kk * ic * oc) * w
  inner_pj = tiles * (wgt_reads * e.wbuf_read_pj_per_bit
                      + act_reads * e.ibuf_read_pj_per_bit
                      + psums * (e.obuf_read_pj_per_bit + e.obuf_write_pj_per_bit))
  return {"trips": trips, "tile": tile, "fits": fits, "compute": compute,
          "inner_pj": inner_pj}


def _order_ids() -> np.ndarray:
  """`ORDERS` as loop indices into `LOOPS`, `[R, 5]`."""
  return np.asarray([[LOOPS.index(l) for l in o] for o in ORDERS], np.int32)


def _with_order(target, free: dict, order: Array) -> dict[str, Array]:
  """DRAM traffic, stalls, cycles and energy of a loop order.

  `order` holds 5 loop indices into `LOOPS`, outermost first (traced).
  """
  e = target.buffer_energy
  caps = {"wgt": target.wbuf_bytes * 4.0, "act": target.ibuf_bytes * 4.0,
          "out": target.obuf_bytes * 4.0}
  trips = jnp.stack(jnp.broadcast_arrays(*(free["trips"][l] for l in LOOPS)))
  traffic, peak = {}, {}
  for ns, size in free["tile"].items():
    depends = jnp.asarray([l in DEPENDS[ns] for l in LOOPS])
    top, inside = size, jnp.ones_like(size, bool)
    for pos in reversed(range(len(LOOPS))):
      loop = order[pos]
      dep = depends[loop]
      size = jnp.where(dep | ~inside, size * trips[loop], size)
      inside = inside & (~dep | (size <= caps[ns]))
      top = jnp.where(dep & inside, size, top)
    traffic[ns], peak[ns] = size, top
  compute = free["compute"]
  dram = traffic["wgt"] + traffic["act"] + 2.0 * traffic["out"]
  first = peak["wgt"] + peak["act"] + peak["out"]
  last = peak["out"]
  width = target.interface_bits
  stall = (jnp.maximum(ceil_div(dram - first - last, width) - compute, 0.0)
           + ceil_div(first, width) + ceil_div(last, width))
  sram_pj = (free["inner_pj"] + traffic["wgt"] * e.wbuf_write_pj_per_bit
             + traffic["act"] * e.ibuf_write_pj_per_bit
             + traffic["out"] * (e.obuf_read_pj_per_bit + e.obuf_write_pj_per_bit))
  compute_pj = compute * e.array_pj_per_cycle
  dram_pj = dram * target.dram_pj_per_bit
  return {"compute": compute, "stall": stall,
          "cycles": jnp.where(free["fits"], compute + stall, jnp.inf),
          "energy_pj": compute_pj + sram_pj + dram_pj, "compute_pj": compute_pj,
          "sram_pj": sram_pj, "dram_pj": dram_pj, "wgt_bits": traffic["wgt"],
          "act_bits": traffic["act"], "out_bits": 2.0 * traffic["out"]}


def _chosen(target, g: Geometry, w: Array, a: Array) -> dict[str, Array]:
  """The fewest-cycles, then least-energy schedule of `g` at bits `w`, `a`.

  `g`, `w` and `a` broadcast to a shape `[...]`; the candidate tiles run on a
  new last axis, the orders in a scan that keeps the best so far. Returns the
  schedule (`Tiling` fields) and its statistics (`_with_order`), per group.
  """
  exps = candidates(8.0 * target.obuf_bytes, target.cols)
  gx = Geometry(*(jnp.expand_dims(v, -1) for v in g))
  wx, ax = jnp.expand_dims(w, -1), jnp.expand_dims(a, -1)
  b, o, ic, oc = _tiles(gx, exps, target.cols)
  free = _order_free(target, gx, wx, ax, b, o, ic, oc)
  tiling = {"b": b, "o": o, "ic": ic, "oc": oc}

  keys = ("cycles", "compute", "stall", "energy_pj", "sram_pj", "wgt_bits",
          "act_bits", "out_bits", "b", "o", "ic", "oc")

  def step(carry, order):
    low, best = carry
    s = _with_order(target, free, order[1:]) | tiling
    shortest = s["cycles"].min(-1)
    tied = s["cycles"] <= shortest[..., None] * (1.0 + TIE_RTOL)
    energy = jnp.where(tied, s["energy_pj"], jnp.inf)
    cand = energy.argmin(-1)[..., None]
    pick = lambda v: jnp.take_along_axis(  # pylint: disable=g-long-lambda
        jnp.broadcast_to(v, cand.shape[:-1] + v.shape[-1:]), cand, -1)[..., 0]
    new = {k: pick(s[k]) for k in keys}
    new["order"] = jnp.full(cand.shape[:-1], order[0], jnp.float32)
    low = jnp.minimum(low, shortest)
    keep = best["cycles"] <= low * (1.0 + TIE_RTOL)
    take = (shortest <= low * (1.0 + TIE_RTOL)) & (
        ~keep | (new["energy_pj"] < best["energy_pj"]))
    return (low, {k: jnp.where(take, new[k], best[k]) for k in best}), None

  shape = jnp.broadcast_shapes(free["compute"].shape, free["tile"]["act"].shape,
                               free["tile"]["wgt"].shape)[:-1]
  best = {k: jnp.full(shape, jnp.inf) for k in keys + ("order",)}
  ids = _order_ids()
  rows = jnp.asarray(np.concatenate([np.arange(len(ids))[:, None], ids], 1))
  (_, out), _ = jax.lax.scan(step, (jnp.full(shape, jnp.inf), best), rows)
  out["compute_pj"] = out["compute"] * target.buffer_energy.array_pj_per_cycle
  out["dram_pj"] = out["energy_pj"] - out["compute_pj"] - out["sram_pj"]
  return out


def table(target, layers: Layers) -> dict[str, Array]:
  """Each layer's schedule at every integer `(w, a)` in 1..8: `[L, 8, 8]` arrays.

  Keys: the tile sizes `b`, `o`, `ic`, `oc` and the `order` (an index into
  `ORDERS`); per group of the layer: `cycles`, `compute`, `stall`,
  `energy_pj` and its parts `compute_pj`, `sram_pj`, `dram_pj`, and the DRAM
  bits of the weights, inputs and partial sums (`wgt_bits`, `act_bits`,
  `out_bits`). The layers run in chunks of `CHUNK` under `lax.map`, which
  keeps each chunk's candidates in cache.
  """
  g = geometry(layers)
  n = len(layers)
  pad = -n % CHUNK
  chunks = Geometry(*(jnp.pad(v, (0, pad), mode="edge").reshape(-1, CHUNK)
                      for v in g))
  bits = jnp.arange(1.0, 9.0)

  def one(chunk):
    return _chosen(target, Geometry(*chunk), bits[:, None, None],
                   bits[None, :, None])                          # [8, 8, CHUNK]

  out = jax.lax.map(one, tuple(chunks))                     # [C, 8, 8, CHUNK]
  return {k: jnp.moveaxis(v, -1, 1).reshape(-1, 8, 8)[:n] for k, v in out.items()}


def tiled_cost(target, layers: Layers, w_bits: ArrayLike,
               a_bits: ArrayLike) -> dict[str, Array]:
  """Per-layer costs `[..., L]` of `target` (a `BitFusion`) under this model.

  The schedule of each layer at each integer `(w, a)` in 1..8 is searched
  once (`table`); bits `[..., L]` (rounded, 32 as 8) select from it, so one
  compilation serves every policy and a batch of policies costs one search.
  """
  t = table(target, layers)
  w = jnp.round(effective_bits(w_bits))
  a = jnp.round(effective_bits(a_bits))
  shape = jnp.broadcast_shapes(w.shape, a.shape, layers.m.shape)
  wi = jnp.broadcast_to(w, shape).astype(jnp.int32) - 1
  ai = jnp.broadcast_to(a, shape).astype(jnp.int32) - 1
  layer = jnp.broadcast_to(jnp.arange(len(layers)), shape)
  get = lambda k: t[k][layer, wi, ai] * layers.groups             # [..., L]
  cycles, compute = get("cycles"), get("compute")
  wgt, act, out = get("wgt_bits"), get("act_bits"), get("out_bits")
  peak = target.rows * target.cols * fused_products(w, a)
  return {
      "cycles": cycles,
      "compute_cycles": compute,
      "stall_cycles": cycles - compute,
      "latency_s": cycles / target.clock_hz,
      "energy_j": get("energy_pj") * 1e-12,
      "compute_energy_j": get("compute_pj") * 1e-12,
      "sram_energy_j": get("sram_pj") * 1e-12,
      "dram_energy_j": get("dram_pj") * 1e-12,
      "dram_bytes": (wgt + act + out) / 8.0,
      "filter_dram_bytes": wgt / 8.0,
      "ifmap_dram_bytes": act / 8.0,
      "ofmap_dram_bytes": out / 8.0,
      "utilization": layers.macs / (peak * cycles),
  }
