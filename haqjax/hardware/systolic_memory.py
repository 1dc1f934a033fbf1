"""SCALE-Sim's double-buffered scratchpads as a closed-form stall model.

SCALE-Sim (v2/v3, `scalesim.memory.double_buffered_scratchpad_mem`) runs the
array's demand matrices, one row per cycle, through three buffers:

  * ifmap and filter read buffers (`read_buffer`) of `S` words, split into an
    active half `A = ceil(S / 2)` and a prefetch half `P = S - A`. The
    operand's prefetch matrix (its fold tiles in order, rolled along the
    systolic skew) is cut into hashed lines of `e = ceil(S / 100)` words; the
    active window holds `a = ceil(A / e)` lines. A demanded word outside the
    window moves the window forward by `p' = min(ceil(P / e), lines - a)`
    lines, cyclically over the operand, and fetches `ceil(P / bw)` DRAM lines
    of `bw` words. The first window is filled before cycle 0 (no stall).
    Prefetch `j` completes at cycle `1 + j * (ceil(P / bw) + 1)`, whatever the
    demand's time: the DRAM stream runs back to back from cycle 0.
  * an ofmap write buffer of `S_o` words that drains `D = S_o - ceil(S_o / 2)`
    words in `ceil(D / bw)` cycles once more than `D` are held, and stalls the
    array only when it is full while a drain runs.

A row stalls by the largest of the three buffers' delays; every later row
moves by it. DRAM reads are counted in whole request lines: the first window,
`min(ceil(A / bw), ceil(E / bw)) * bw` words (`E`: the prefetch matrix with
its padding), plus `ceil(P / bw) * bw` per window move.

The closed form here follows that logic per operand:

  * sweep: the demand passes over the operand's `lines = floor(U / e) + 1`
    hashed lines (`U` words) `passes` times (output stationary: the ifmap
    once per column fold; weight stationary: the ifmap once per column
    fold, the filter once; input stationary: the ifmap once, the filter once
    per column fold). An operand of `lines <= a` is never re-fetched.
  * window moves: `n = ceil((passes * lines - a) / p')`. Output stationary
    reuses each filter tile (`B` words, `K x cols`) `row folds` times in a
    row; a tile of `b = B / e` lines that a window move evicts in part
    (probability `clip((b - a + p') / p', 0, 1)`) is fetched around the whole
    cycle again per reuse, `lines / p'` more moves each.
  * stalls: move `j` is demanded at the stall-free row
    `r_j = C * (a + (j - 1) p') / (passes * lines)` of a GEMM of `C` compute
    cycles; the array waits `max(0, max_j (1 + j L - r_j))` with
    `L = ceil(P / bw) + 1`, the linear bound taken at `j = 1` and `j = n`.
    The write buffer waits `max(0, ceil((W - S_o) / D) ceil(D / bw) - C (1 -
    D / W))` for `W` written words. A GEMM stalls by the largest of the
    three.

What the closed form leaves out, and so where it departs from SCALE-Sim:
the fold boundaries, where the skew of one fold interleaves with the next
and a window move can evict words still to be read (each such event costs
SCALE-Sim a whole extra cycle over the operand); SCALE-Sim's stall
accounting, which counts a positive wait twice and lets a negative one move
the row back, so its stall oscillates around the bound above by up to one
prefetch time; and partly filled write lines (a few words per drain). So the model bounds
SCALE-Sim's reads and cycles from below. Over the 12 layers of
tests/hardware_scalesim_memory_test.py (`python tests/...` prints them):
total cycles are off by 18.7% on average (max 81%; the roofline: 33%, max
95%), ifmap reads 39% (max 90%), filter reads 7.1% (max 57%), ofmap writes
0.14%; stall-free cycles, and traffic and stalls of operands that fit their
SRAM, are exact.

Bits: SCALE-Sim's words are bytes (`word_size = 1` in `single_layer_sim`),
so an 8-bit operand is one word and its bandwidth is bytes per cycle. An
operand of `b` bits packs `8 / b` words per byte: an SRAM of `S` bytes holds
`8 S / b` words and a port of `bw` bytes per cycle moves `8 bw / b` words per
cycle (fractional words are kept: the model stays a function of traced bits).
At 8 bits every quantity is SCALE-Sim's.

References:
  A. Samajdar et al., "A Systematic Methodology for Characterizing
  Scalability of DNN Accelerators using SCALE-Sim", ISPASS 2020.
  scalesim-project/scale-sim-v2, `scalesim/memory/read_buffer.py`,
  `write_buffer.py`, `double_buffered_scratchpad_mem.py`.
"""

from __future__ import annotations

import jax.numpy as jnp

from haqjax.hardware.layers import ceil_div
from haqjax.typing import Array

# SCALE-Sim's hashed buffer splits an SRAM into this many lookup sets.
HASH_SETS = 100.0


def operand_sweeps(dataflow: str, rows: int, cols: int, m: Array, n: Array,
                   k: Array) -> dict[str, dict[str, Array]]:
  """How the demand sweeps each operand of one GEMM (SCALE-Sim's fold order).

  Args:
    dataflow: 'os', 'ws' or 'is'.
    rows, cols: array size.
    m, n, k: GEMM sizes.

  Returns:
    For 'ifmap' and 'filter': `words` (operand words, `U`), `padded` (words of
    the prefetch matrix with its fold padding, `E`), `passes`, `tile` (words
    of a reused tile) and `reuses` (consecutive uses of each tile, 1 if none),
    `tiles`; for 'ofmap': `words` (written words, partial sums included).
  """
  ones = jnp.ones_like(m * n * k)
  if dataflow == "os":
    fr, fc = ceil_div(m, rows), ceil_div(n, cols)
    ifmap = dict(padded=fr * rows * k, passes=fc)
    filt = dict(padded=fc * cols * k, passes=ones, tile=k * cols, reuses=fr,
                tiles=fc)
    written = m * n
  elif dataflow == "ws":
    fr, fc = ceil_div(k, rows), ceil_div(n, cols)
    ifmap = dict(padded=fr * rows * m, passes=fc)
    filt = dict(padded=fc * cols * k, passes=ones)
    written = m * n * fr
  elif dataflow == "is":
    fr, fc = ceil_div(k, rows), ceil_div(m, cols)
    ifmap = dict(padded=fc * cols * k, passes=ones)
    filt = dict(padded=fr * rows * n, passes=fc)
    written = m * n * fr
  else:
    raise ValueError(f"dataflow is {dataflow!r}; allowed: 'os', 'ws', 'is'")
  zero = jnp.zeros_like(ones)
  for d in (ifmap, filt):
    d.setdefault("tile", zero)
    d.setdefault("reuses", ones)
    d.setdefault("tiles", zero)
  ifmap["words"] = m * k * ones
  filt["words"] = k * n * ones
  return {"ifmap": ifmap, "filter": filt, "ofmap": {"words": written * ones}}


def read_buffer(sweep: dict[str, Array], sram_words: Array, bw: Array,
                compute: Array) -> tuple[Array, Array]:
  """DRAM words read and stall cycles of one operand's read buffer.

  Args:
    sweep: one operand of `operand_sweeps`.
    sram_words: buffer size in words `S`.
    bw: DRAM words per cycle.
    compute: stall-free cycles `C` of the GEMM.

  Returns:
    `(dram_words, stall_cycles)`.
  """
  s = sram_words
  active = jnp.ceil(s / 2.0)
  prefetch = s - active
  e = jnp.ceil(s / HASH_SETS)
  lines = jnp.floor(sweep["words"] / e) + 1.0
  a = jnp.ceil(active / e)
  fits = lines <= a
  step = jnp.maximum(jnp.minimum(jnp.ceil(prefetch / e), lines - a), 1.0)
  sweep_lines = sweep["passes"] * lines
  moves = (sweep_lines - a) / step
  # Output stationary: a filter tile straddling a window boundary is fetched
  # around the whole cycle again on each of its reuses.
  straddle = jnp.clip((sweep["tile"] / e - a + step) / step, 0.0, 1.0)
  moves += sweep["tiles"] * straddle * (sweep["reuses"] - 1.0) * lines / step
  moves = jnp.where(fits, 0.0, jnp.ceil(jnp.maximum(moves, 0.0)))
  per_move = jnp.ceil(prefetch / bw)
  first = jnp.minimum(jnp.ceil(active / bw), jnp.ceil(sweep["padded"] / bw))
  dram = (first + moves * per_move) * bw
  # The prefetch stream against the stall-free rows that need each move.
  period = per_move + 1.0
  row = lambda j: compute * jnp.minimum(1.0, (a + (j - 1.0) * step) / sweep_lines)
  wait = jnp.maximum(1.0 + period - row(1.0),
                     1.0 + moves * period - row(jnp.maximum(moves, 1.0)))
  stall = jnp.where(moves > 0, jnp.maximum(wait, 0.0), 0.0)
  return dram, stall


def write_buffer(words: Array, sram_words: Array, bw: Array,
                 compute: Array) -> tuple[Array, Array]:
  """DRAM words written and stall cycles of the ofmap write buffer."""
  drain = sram_words - jnp.ceil(sram_words / 2.0)
  drain_cycles = jnp.ceil(drain / bw)
  drains = jnp.ceil(jnp.maximum(words - sram_words, 0.0) / drain)
  wait = drains * drain_cycles - compute * (1.0 - drain / jnp.maximum(words, 1.0))
  stall = jnp.where(words > sram_words, jnp.maximum(wait, 0.0), 0.0)
  return words, stall


def scratchpad_costs(dataflow: str, rows: int, cols: int, m: Array, n: Array,
                     k: Array, compute: Array, sram_words: dict[str, Array],
                     bw_words: dict[str, Array]) -> dict[str, Array]:
  """Stall cycles and DRAM words of one GEMM on SCALE-Sim's scratchpads.

  Args:
    dataflow, rows, cols, m, n, k: the GEMM on the array.
    compute: its stall-free cycles.
    sram_words: 'ifmap', 'filter', 'ofmap' buffer sizes in words.
    bw_words: 'ifmap', 'filter', 'ofmap' DRAM words per cycle.

  Returns:
    `stall_cycles` and `ifmap_words`, `filter_words`, `ofmap_words` (DRAM).
  """
  sweeps = operand_sweeps(dataflow, rows, cols, m, n, k)
  out, stalls = {}, []
  for name in ("ifmap", "filter"):
    words, stall = read_buffer(sweeps[name], sram_words[name], bw_words[name], compute)
    out[f"{name}_words"] = words
    stalls.append(stall)
  words, stall = write_buffer(sweeps["ofmap"]["words"], sram_words["ofmap"],
                              bw_words["ofmap"], compute)
  out["ofmap_words"] = words
  stalls.append(stall)
  out["stall_cycles"] = jnp.maximum(jnp.maximum(stalls[0], stalls[1]), stalls[2])
  return out
