"""SCALE-Sim's double-buffered scratchpads, followed fold by fold.

SCALE-Sim (v2/v3, `scalesim.memory.double_buffered_scratchpad_mem`) runs the
array's demand matrices, one row per cycle, through three buffers:

  * ifmap and filter read buffers (`read_buffer`) of `S` words, split into an
    active half `A = ceil(S / 2)` and a prefetch half `P = S - A`. The
    operand's prefetch matrix is cut, skipping its `-1` padding, into
    `lines = floor(U / e) + 1` hashed lines of `e = ceil(S / 100)` words
    (`U` operand words); the window holds `a = ceil(A / e)` lines. A demanded
    word outside the window moves it forward by `step = min(ceil(P / e),
    lines - a)` lines, cyclically over the operand (after `j` moves it starts
    at line `j * step mod lines`), as often as needed, and each move reads
    `ceil(P / bw)` DRAM lines of `bw` words. The first window is filled
    before cycle 0; move `j` completes at cycle `j * (ceil(P / bw) + 1) - 1`,
    whatever the demand's time: the DRAM stream runs back to back.
  * an ofmap write buffer of `S_o` words that drains `D = S_o - ceil(S_o / 2)`
    words in `ceil(D / bw)` cycles once more than `D` are held, and stalls the
    array only when it is full while a drain runs.

The demand reads the prefetch matrix fold by fold (`operand_sweeps`): a
rolled operand (output stationary: both; weight stationary: the ifmap; input
stationary: the filter) one fold of the array after the other, each fold
reaching over its skew into its neighbours, so that the demand steps back
over `width - 1` diagonals at each fold boundary, and back to a fold's start
when it is read again (output stationary's filter, once per row fold); a
reversed operand (weight stationary's filter, input stationary's ifmap) tile
by tile, each tile's rows last row first. `window_walk` follows the window
over these blocks: forward to the block's first demanded line; around the
whole operand (one turn: `lines / step` moves) when that line, or a lower
row of a reversed tile, lies behind the window's start, as SCALE-Sim does
(a reversed tile turns to its highest lost row, then forward over that
row's words, which may lose the rows below again); forward over the block.
SCALE-Sim looks a demanded word up anywhere in the window, so an im2col
copy of it elsewhere serves it, and the window moves only for words none
of whose copies it holds; when the layer's stride is known
(`Layers.conv_geometry`, as `topology` and `model_layers` give it), the
walk follows this address by address over a reversed tile of im2col rows
(input stationary's ifmap of a conv whose kernel exceeds its stride;
`systolic_window`) and over the folds of a weight- or output-stationary
ifmap whose last outputs read past the input or whose kernel exceeds its
stride (`systolic_fold_window`).
Stalls: SCALE-Sim waits at the row that needs a move until that move
completes, and counts the wait for the last prefetch twice; the walk does
the same per block, at the row of its last move. The write buffer credits
a drain's `D` words back when the drain starts, so the array writes
`S_o + D` words before the first wait (`write_buffer`). A GEMM stalls by
the largest of the three. DRAM reads are whole request lines: the first
window, `min(ceil(A / bw), ceil(E / bw)) * bw` words (`E`: the prefetch
matrix with its padding), plus `ceil(P / bw) * bw` per move.

What departs from SCALE-Sim, or did (arrays 4x4 to 128x128, the three
dataflows, 1 to 64 KiB SRAMs, 1 to 32 words per cycle):

  * Without a known stride (layers built by hand), a reversed tile of
    im2col rows takes all of its words as found in the window (no turn):
    up to 93% fewer ifmap words (81% fewer cycles) than SCALE-Sim.
  * SCALE-Sim's conv topology gives a layer `ceil((H - R + s) / s)` outputs
    a side; when `s` does not divide `H - R`, the last ones read outside the
    input and hold `-1` words, which SCALE-Sim leaves out of its lines. With
    a known stride the walk counts only the words inside the input
    (`systolic_window.inside_words`) and the address walks place them as
    SCALE-Sim does (`systolic_window.inside_position`; the rolled ifmaps of
    weight and output stationary on its diagonals:
    `stack_diagonals`). Without, it counts `m * k` words (a
    12x12 1x1 stride-2 conv on 8x8 arrays: 60% fewer ifmap words).
  * The address walks take the im2col copies SCALE-Sim finds in its window.
    The fold walk, which takes none, read up to 233% more ifmap words of a
    weight-stationary conv and 400% more of an output-stationary one; on a
    ResNet-20 layer's shape (10x10x64 3x3 on a 32x32 array with 64 KiB), it
    was 104% (weight stationary) and 174% (output stationary) over
    SCALE-Sim's cycles, where the address walks are within 8%.
  * Stalls oscillate in SCALE-Sim around the wait above by up to one
    prefetch time, as its counted waits shift later rows; where the traffic
    is exact, total cycles are within about 2% on average (31% at worst, on
    a 128x128 array whose few folds each wait).

On the 21 layers of `haqjax.hardware.scalesim_reference` total cycles are
off by 1.8% on average (5.6% at worst) and the DRAM words read are
SCALE-Sim's; on its 60 random layers and arrays (`sample_cases`; both sets
printed by `python -m experiments.bench hardware`) every DRAM word read is
SCALE-Sim's and total cycles are off by 1.6% on average (output, weight and
input stationary 2.9%, 0.8%, 0.6%; 22% at worst, a 5x5 stride-2 conv on a
16x16 array whose ifmap stalls oscillate).

The walk is a `jax.lax.while_loop` over folds, jit-able and traced in the
bits; past `MAX_SEGMENTS` folds its moves and stalls are extrapolated at the
rate of the first ones. The address walks look the words up
`systolic_window.CHUNK_ROWS` rows (`systolic_fold_window.CHUNK_DIAGONALS`
diagonals) at a time, again after each move (about 10 s for the [1, 8, 8]
cost tensor of an input-stationary 56x56 3x3 conv of 64 channels on a 32x32
array with 64 KiB SRAMs, on one CPU core; `python -m haqjax.hardware
--model=resnet18` on a weight- or output-stationary 32x32 array with 64
KiB SRAMs, about 26 s and 37 s). `haqjax.hardware.Systolic` runs each
buffer's walk on the bits it depends on (the ifmap's on the activation
bits), so a `[L, 8, 8]` cost tensor walks `8 L` ifmaps, not `64 L`; most of
a first call is XLA's compile (about 5 s; 9 s with the address walk),
whatever the array's size.

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
  `write_buffer.py`, `double_buffered_scratchpad_mem.py`,
  `scalesim/compute/systolic_compute_{os,ws,is}.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from haqjax.hardware import systolic_window
from haqjax.hardware import systolic_fold_window
from haqjax.hardware.layers import ceil_div
from haqjax.typing import Array, ArrayLike

# SCALE-Sim's hashed buffer splits an SRAM into this many lookup sets.
HASH_SETS = 100.0
# Folds followed one by one; later ones are extrapolated.
MAX_SEGMENTS = 4096


def operand_sweeps(dataflow: str, rows: ArrayLike, cols: ArrayLike, m: Array, n: Array,
                   k: Array, ifmap_words: Array | None = None
                   ) -> dict[str, dict[str, Array]]:
  """How the demand walks each operand of one GEMM (SCALE-Sim's fold order).

  An operand's prefetch matrix is `folds` folds of `temporal` rows of
  `width` words (the last fold `last` words wide). The demand reads one
  block per fold of the array, `segments` in all: segment `i` reads block
  `(i // inner) % blocks`, in pass `i // (inner * blocks)`. A rolled operand's
  block is a whole fold (`per = 1`); a reversed one's is a tile of
  `tile_rows` rows of a fold (`per` tiles per fold), read last row first.

  Args:
    dataflow: 'os', 'ws' or 'is'.
    rows, cols: array size.
    m, n, k: GEMM sizes.
    ifmap_words: distinct input words of the GEMM (fewer than `m * k` when
      im2col copies them); None: `m * k`.

  Returns:
    For 'ifmap' and 'filter': `words` (operand words, `U`), `padded` (words of
    the prefetch matrix with its fold padding, `E`), `copies` (1.0 when the
    operand holds im2col copies of its words) and the fields above;
    for 'ofmap': `words` (written words, partial sums included).
  """
  ones = jnp.ones_like(m * n * k)

  def rolled(folds, inner, temporal, width, size):
    return dict(blocks=folds, inner=inner * ones, temporal=temporal * ones,
                width=width * ones, last=size - (folds - 1.0) * width,
                per=ones, tile_rows=temporal * ones, reversed=0.0 * ones)

  def tiles(folds, per, temporal, width, size):
    return dict(blocks=folds * per, inner=ones, temporal=temporal * ones,
                width=width * ones, last=size - (folds - 1.0) * width, per=per,
                tile_rows=rows * ones, reversed=ones)

  if dataflow == "os":
    fr, fc = ceil_div(m, rows), ceil_div(n, cols)
    ifmap = dict(padded=fr * rows * k, **rolled(fr, 1.0, k, rows, m))
    # Each filter fold is read once per row fold.
    filt = dict(padded=fc * cols * k, **rolled(fc, fr, k, cols, n))
    written = m * n
  elif dataflow == "ws":
    fr, fc = ceil_div(k, rows), ceil_div(n, cols)
    ifmap = dict(padded=fr * rows * m, **rolled(fr, 1.0, m, rows, k))
    filt = dict(padded=fc * cols * k, **tiles(fc, fr, k, cols, n))
    written = m * n * fr
  elif dataflow == "is":
    fr, fc = ceil_div(k, rows), ceil_div(m, cols)
    ifmap = dict(padded=fc * cols * k, **tiles(fc, fr, k, cols, m))
    filt = dict(padded=fr * rows * n, **rolled(fr, 1.0, n, rows, k))
    written = m * n * fr
  else:
    raise ValueError(f"dataflow is {dataflow!r}; allowed: 'os', 'ws', 'is'")
  ifmap["words"] = m * k * ones
  filt["words"] = k * n * ones
  distinct = ifmap["words"] if ifmap_words is None else ifmap_words
  ifmap["copies"] = (distinct < ifmap["words"]) * ones
  filt["copies"] = 0.0 * ones
  for d in (ifmap, filt):
    d["segments"] = fr * fc * ones
  return {"ifmap": ifmap, "filter": filt, "ofmap": {"words": written * ones}}


def window_walk(sweep: dict[str, Array], e: Array, a: Array, step: Array,
                lines: Array, period: Array, fold_rows: Array,
                max_segments: int = MAX_SEGMENTS, geometry: dict[str, Array] | None = None,
                rows: int = 1, cols: int = 1,
                gaps: dict[str, Array] | None = None,
                dataflow: str = "ws") -> tuple[Array, Array]:
  """Window moves and stall cycles of one read buffer over the demand.

  Follows the window fold by fold (module docstring). After `max_segments`
  folds the moves and stalls are extrapolated at the rate of those folds.
  With `geometry` (`Layers.conv_geometry`, a known stride), a reversed tile
  of im2col rows is followed address by address
  (`systolic_window.tile_moves`, on an array of `rows` x `cols`), as are,
  with `gaps` (the ifmap's of the rolled `dataflow`, 'ws' or 'os'), the
  folds of a conv whose last outputs read past the input or whose kernel
  exceeds its stride (`systolic_fold_window.fold_moves`).

  Returns:
    `(moves, stall_cycles)`.
  """
  u, nb, inner = sweep["words"], sweep["blocks"], sweep["inner"]
  rev, per, segments = sweep["reversed"] > 0, sweep["per"], sweep["segments"]
  temporal, width, tile_rows = sweep["temporal"], sweep["width"], sweep["tile_rows"]
  # A reversed tile of im2col rows finds the rows a move lost as copies in
  # the tiles ahead, which that move brought in.
  keeps = rev & (sweep["copies"] > 0)
  if geometry is not None:
    exact = keeps & (geometry["stride"] > 0) & (lines > a)
    # Without `-1` words a tile's own lines are those of its positions.
    no_gaps = systolic_window.gapless(geometry)
    words = dict(k=temporal, folds=nb / per, last=sweep["last"], e=e, a=a, step=step,
                 lines=lines)
  if gaps is not None:
    walked = ~rev & (gaps["stride"] > 0) & (lines > a)
    gapped = walked & ~systolic_window.gapless(gaps)
    # Inside the input, a kernel over its stride still reads each word in
    # several places, whose copies serve one another.
    overlapped = walked & ~gapped & ((gaps["kernel_h"] > gaps["stride"])
                                     | (gaps["kernel_w"] > gaps["stride"]))
    fold_words = dict(m=temporal, folds=nb, last=sweep["last"], e=e, a=a, step=step,
                    lines=lines)
  limit = jnp.minimum(segments, float(max_segments))

  def line(w):
    return jnp.floor(jnp.clip(w, 0.0, u - 1.0) / e)

  def around(j, x):
    """Moves from `j` until the window holds line `x` one turn later."""
    return j + jnp.maximum(jnp.ceil((x + lines - a + 1.0 - j * step) / step), 0.0)

  def body(state):
    i, j, turns, stall = state
    live = i < limit
    b = jnp.floor(i / inner) - nb * jnp.floor(i / (inner * nb))
    fold = jnp.floor(b / per)
    w = jnp.where(fold >= nb / per - 1.0, sweep["last"], width)
    tile = b - fold * per
    start = fold * temporal * width + tile * tile_rows * w
    size = jnp.minimum(tile_rows, temporal - tile * tile_rows) * w
    # A rolled fold's skew reaches into its neighbours: back over the last
    # `width - 1` diagonals of the (full) fold before, forward over the
    # first `w - 1` of the next (`nxt` words wide).
    nxt = jnp.where(fold + 1.0 >= nb / per - 1.0, sweep["last"], width)
    v = jnp.minimum(nxt, w - 1.0)
    back = jnp.where(rev, 0.0, width * (width - 1.0) / 2.0)
    ahead = jnp.where(rev, 0.0, v * (v + 1.0) / 2.0 + (w - 1.0 - v) * v)
    base = (jnp.floor(i / (inner * nb)) + turns) * lines
    lo = base + line(start - back)
    hi = base + line(start + size + ahead - 1.0)
    # The window moves forward to the block's first demanded line (a
    # reversed tile's last row).
    first = jnp.where(rev, hi, lo)
    j1 = j + jnp.maximum(jnp.ceil((first - (j * step + a - 1.0)) / step), 0.0)
    # A first line left behind: the window goes around the operand to it.
    # Rows of a reversed tile are demanded downwards: the window goes
    # around to the highest lost row and forward over that row's words,
    # which may lose the rows below it again.

    def lost(s):
      jj, t, top = s
      return live & (lo + t * lines < jj * step) & (top >= 0.0) & ~keeps

    def turn(s):
      jj, t, top = s
      go = lost(s)
      below = (jj * step - base - t * lines) * e - start
      r = jnp.where(rev, jnp.clip(jnp.ceil(below / w) - 1.0, 0.0, top), 0.0)
      target = jnp.where(rev, base + t * lines + line(start + r * w), lo + t * lines)
      j_turn = around(jj, target)
      end = jnp.where(rev, base + (t + 1.0) * lines + line(start + r * w + w - 1.0), 0.0)
      j_turn = j_turn + jnp.maximum(jnp.ceil((end - (j_turn * step + a - 1.0)) / step), 0.0)
      return (jnp.where(go, j_turn, jj), t + go,
              jnp.where(go, jnp.where(rev, r - 1.0, -1.0), top))

    rows_in = jnp.where(rev, size / w, 1.0)
    j2, t2, top = jax.lax.while_loop(lambda s: jnp.any(lost(s)), turn,
                                     (j1, 0.0 * j1, rows_in - 1.0))
    x = base + line(start + (top + 1.0) * w)
    row_lines = w / e
    if geometry is not None:
      # A tile whose own lines are all in the window needs no move.
      d_lo, d_hi = (jnp.mod(line(x) - j * step, lines) for x in (start, start + size - 1.0))
      held = (d_lo < a) & (d_hi < a) & (d_lo <= d_hi) & no_gaps
      j_exact, r_exact = systolic_window.tile_moves(
          geometry, words, fold, tile * tile_rows + rows_in - 1.0, rows_in,
          exact & live & ~held, j, rows, cols)
      j2 = jnp.where(exact, j_exact, j2)
      t2 = jnp.where(exact, 0.0, t2)
    # Forward over the rest of a rolled block.
    hi2 = hi + t2 * lines
    j3 = jnp.where(rev, j2, j2 + jnp.maximum(
        jnp.ceil((hi2 - (j2 * step + a - 1.0)) / step), 0.0))
    # The prefetch stream (move `j` done at `j * period - 1`) against the
    # row that needs the block's last move.
    need = jnp.where(j3 > j2, (j3 - 1.0) * step + a - (lo + t2 * lines), 0.0)
    frac = jnp.clip(need / jnp.maximum(hi - lo, 1.0), 0.0, 1.0)
    # A reversed tile's last turn comes at the demand row of its lost row.
    row = i * fold_rows + jnp.where(rev, (hi - x) / row_lines, frac * fold_rows)
    if geometry is not None:
      # SCALE-Sim's partial tile starts with its `-1` rows.
      row = jnp.where(exact, i * fold_rows + tile_rows - rows_in + r_exact, row)
    if gaps is not None:
      # The fold's demand address by address (copies in other folds serve
      # it); a fold whose own lines are all in the window needs no move.
      j_fold, t_fold = systolic_fold_window.fold_moves(
          gaps, fold_words, fold, gapped & live, j, rows, dataflow=dataflow)
      # Without `-1` words, the faster closed-form positions.
      j_ov, t_ov = systolic_fold_window.fold_moves(
          gaps, fold_words, fold, overlapped & live, j, rows, gapless=True, dataflow=dataflow)
      j_fold = jnp.where(overlapped, j_ov, j_fold)
      t_fold = jnp.where(overlapped, t_ov, t_fold)
      walk = gapped | overlapped
      j3 = jnp.where(walk, j_fold, j3)
      t2 = jnp.where(walk, 0.0, t2)
      # Weight stationary demands its ifmap after the `rows` cycles that
      # load the weights.
      skew = rows if dataflow == "ws" else 0
      row = jnp.where(walk, i * fold_rows + skew + t_fold, row)
    late = jnp.where(j3 > j, j3 * period - row - stall - 2.0, 0.0)
    # SCALE-Sim counts the wait for the last prefetch twice.
    late = jnp.maximum(late, 0.0)
    stall = stall + jnp.where(live, late + jnp.minimum(late, period), 0.0)
    return (i + live, jnp.where(live, j3, j), turns + jnp.where(live, t2, 0.0), stall)

  zero = 0.0 * (u + e + a + step + lines + period + fold_rows)
  _, j, _, stall = jax.lax.while_loop(lambda s: jnp.any(s[0] < limit), body,
                                      (zero, zero, zero, zero))
  scale = segments / jnp.maximum(limit, 1.0)
  return j * scale, stall * scale


def read_buffer(sweep: dict[str, Array], sram_words: Array, bw: Array,
                compute: Array, geometry: dict[str, Array] | None = None,
                rows: int = 1, cols: int = 1,
                gaps: dict[str, Array] | None = None,
                dataflow: str = "ws") -> tuple[Array, Array]:
  """DRAM words read and stall cycles of one operand's read buffer.

  Args:
    sweep: one operand of `operand_sweeps`.
    sram_words: buffer size in words `S`.
    bw: DRAM words per cycle.
    compute: stall-free cycles `C` of the GEMM.
    geometry, rows, cols: an input-stationary ifmap's conv on the array
      (`window_walk`).
    gaps, dataflow: a rolled ifmap's conv and the dataflow (`window_walk`).

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
  per_move = jnp.ceil(prefetch / bw)
  moves, stall = window_walk(sweep, e, a, step, lines, per_move + 1.0,
                             compute / sweep["segments"], geometry=geometry,
                             rows=rows, cols=cols, gaps=gaps, dataflow=dataflow)
  moves = jnp.where(fits, 0.0, moves)
  stall = jnp.where(fits, 0.0, stall)
  first = jnp.minimum(jnp.ceil(active / bw), jnp.ceil(sweep["padded"] / bw))
  return (first + moves * per_move) * bw, stall


def write_buffer(words: Array, sram_words: Array, bw: Array,
                 compute: Array) -> tuple[Array, Array]:
  """DRAM words written and stall cycles of the ofmap write buffer.

  SCALE-Sim's `write_buffer` starts a drain of `D` words at a write that
  finds more than `D` held and no drain running, and credits the `D` words
  back at once; the drain's last line goes out `T = ceil(D / bw) - 1` cycles
  later, and a write that fills the buffer (`S_o` held) while it runs waits
  for it. With the `W` words written at the stall-free rate `r = W / C`, the
  first drain starts at word `D + 1`; when a drain's `r T` words outrun its
  `D`, the drains run back to back and the `j`-th word past `S_o + m D`
  (m = floor((W - S_o) / D) drains) waits for the `m`-th drain's end, so the
  array loses `max(0, (m (r T - D) - (S_o - D - 1)) / r)` cycles.
  """
  drain = sram_words - jnp.ceil(sram_words / 2.0)
  period = jnp.maximum(jnp.ceil(drain / bw) - 1.0, 0.0)
  rate = words / jnp.maximum(compute, 1.0)
  drains = jnp.floor(jnp.maximum(words - sram_words, 0.0) / drain)
  late = drains * (rate * period - drain) - (sram_words - drain - 1.0)
  stall = jnp.maximum(late, 0.0) / jnp.maximum(rate, 1e-9)
  return words, stall


@functools.partial(jax.jit, static_argnames=("dataflow", "rows", "cols"))
def scratchpad_costs(dataflow: str, rows: int, cols: int, m: Array, n: Array,
                     k: Array, compute: Array, sram_words: dict[str, Array],
                     bw_words: dict[str, Array], ifmap_words: Array | None = None,
                     geometry: dict[str, Array] | None = None) -> dict[str, Array]:
  """Stall cycles and DRAM words of one GEMM on SCALE-Sim's scratchpads.

  Args:
    dataflow, rows, cols, m, n, k: the GEMM on the array.
    compute: its stall-free cycles.
    sram_words: 'ifmap', 'filter', 'ofmap' buffer sizes in words.
    bw_words: 'ifmap', 'filter', 'ofmap' DRAM words per cycle.
    ifmap_words: distinct input words (`operand_sweeps`).
    geometry: `Layers.conv_geometry`: an input-stationary ifmap with im2col
      copies, or a weight- or output-stationary one with words past the
      input or a kernel over its stride, is then followed address by address
      (`systolic_window`, `systolic_fold_window`).

  Returns:
    `stall_cycles` and `ifmap_words`, `filter_words`, `ofmap_words` (DRAM).
  """
  sweeps = operand_sweeps(dataflow, rows, cols, m, n, k, ifmap_words)
  if geometry is not None:
    past = (geometry["stride"] > 0) & ~systolic_window.gapless(geometry)
    sweeps["ifmap"]["words"] = jnp.where(past, systolic_window.inside_words(geometry, m),
                                         sweeps["ifmap"]["words"])
  out, stalls = {}, []
  for name in ("ifmap", "filter"):
    g = geometry if name == "ifmap" and dataflow == "is" else None
    gaps = geometry if name == "ifmap" and dataflow in ("ws", "os") else None
    words, stall = read_buffer(sweeps[name], sram_words[name], bw_words[name], compute,
                               geometry=g, rows=rows, cols=cols, gaps=gaps,
                               dataflow=dataflow)
    out[f"{name}_words"] = words
    stalls.append(stall)
  words, stall = write_buffer(sweeps["ofmap"]["words"], sram_words["ofmap"],
                              bw_words["ofmap"], compute)
  out["ofmap_words"] = words
  stalls.append(stall)
  out["stall_cycles"] = jnp.maximum(jnp.maximum(stalls[0], stalls[1]), stalls[2])
  return out
