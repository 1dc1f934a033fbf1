"""SCALE-Sim's read window over an input-stationary im2col ifmap, address by address.

Input stationary (SCALE-Sim's `systolic_compute_is`) prefetches the ifmap
as its im2col matrix, fold after fold of `cols` output pixels: fold `f`
holds `k` rows (one per im2col column `kk = (r S + c) C + ch`) of its
pixels' words, the last fold `last` pixels wide. A conv with a kernel over
its stride reads each input word several times, so the read buffer's hashed
lines (`systolic_memory`) hold copies of one address. SCALE-Sim's
`read_buffer.active_buffer_hit` finds a demanded address in any line of the
window, so a copy brought in ahead serves it: the window moves only for an
address none of whose copies it holds, then by as many prefetches (`step`
lines each, cyclically over the operand's `lines`) as bring the nearest copy
in. `tile_moves` follows this over one tile of the demand (a fold's
`rows` im2col rows, read last row first, each row's pixels left to right),
as SCALE-Sim does; the words' places in the lines skip the `-1` entries of
the outputs that read past the input (`inside_position`, where the stride
does not divide `H - R`). The copies of the word that pixel
`(oh, ow)` reads at `(r, c)` are the pixels `(oh - u, ow - v)` that read it
at `(r + u s, c + v s)`, for the `ceil(R / s) ceil(S / s)` pairs `(u, v)`
that stay inside the kernel and the output.

References:
  scalesim-project/scale-sim-v2, `scalesim/memory/read_buffer.py`,
  `scalesim/compute/operand_matrix.py`, `systolic_compute_is.py`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from haqjax.typing import Array


def output_pixel(p: Array, g: dict[str, Array]) -> tuple[Array, Array, Array]:
  """Image, output row and output column of output pixel `p`."""
  per_image = g["out_h"] * g["out_w"]
  img = jnp.floor(p / per_image)
  q = p - img * per_image
  oh = jnp.floor(q / g["out_w"])
  return img, oh, q - oh * g["out_w"]


def gapless(geometry: dict[str, Array]) -> Array:
  """Whether no output of the conv reads past its input (no `-1` words)."""
  g = geometry
  s = jnp.where(g["stride"] > 0, g["stride"], 1.0)
  return ((g["in_h"] - (g["out_h"] - 1.0) * s >= g["kernel_h"])
          & (g["in_w"] - (g["out_w"] - 1.0) * s >= g["kernel_w"]))


def inside_words(geometry: dict[str, Array], m: Array) -> Array:
  """Words of the im2col matrix that lie inside the input (not `-1`).

  SCALE-Sim's last outputs of a side whose stride does not divide `H - R`
  read past the input for their last kernel rows.
  """
  g = geometry
  s = jnp.where(g["stride"] > 0, g["stride"], 1.0)

  def side(size, out, kernel):
    return (out - 1.0) * kernel + jnp.clip(size - (out - 1.0) * s, 0.0, kernel)

  per_image = g["out_h"] * g["out_w"]
  return (m / per_image * g["channels"] * side(g["in_h"], g["out_h"], g["kernel_h"])
          * side(g["in_w"], g["out_w"], g["kernel_w"]))


def _range_counts(g: dict[str, Array], p0: Array, p1: Array) -> tuple[Array, Array, Array]:
  """Pixels in `[p0, p1)` on the last output row, column, and both."""
  hw = g["out_h"] * g["out_w"]

  def last_rows(p):
    return jnp.floor(p / hw) * g["out_w"] + jnp.clip(p - jnp.floor(p / hw) * hw
                                                     - (g["out_h"] - 1.0) * g["out_w"],
                                                     0.0, g["out_w"])

  def last_cols(p):
    return jnp.floor(p / g["out_w"])

  def corner(p):
    return jnp.floor(p / hw)

  return (last_rows(p1) - last_rows(p0), last_cols(p1) - last_cols(p0),
          corner(p1) - corner(p0))


def _edges(g: dict[str, Array]) -> tuple[Array, Array]:
  """`(vr, vc)`: kernel rows (columns) a side's last output reads inside the input."""
  s = jnp.where(g["stride"] > 0.0, g["stride"], 1.0)
  vr = jnp.clip(g["in_h"] - (g["out_h"] - 1.0) * s, 0.0, g["kernel_h"])
  vc = jnp.clip(g["in_w"] - (g["out_w"] - 1.0) * s, 0.0, g["kernel_w"])
  return vr, vc


def _outside_before(g: dict[str, Array], kk: Array) -> tuple[Array, Array, Array]:
  """im2col columns before `kk` with kernel row `r >= vr`, column `c >= vc`, and both.

  A pixel on the last output row (column, both) reads past the input at
  those columns.
  """
  kh, kw, ch_n = g["kernel_h"], g["kernel_w"], g["channels"]
  vr, vc = _edges(g)
  block = kw * ch_n
  r = jnp.floor(kk / block)
  within = kk - r * block
  rows_out = jnp.maximum(kk - vr * block, 0.0)
  in_row = jnp.clip(within - vc * ch_n, 0.0, (kw - vc) * ch_n)
  cols_out = jnp.minimum(r, kh) * (kw - vc) * ch_n + in_row
  both_out = jnp.maximum(r - vr, 0.0) * (kw - vc) * ch_n + jnp.where(r >= vr, in_row, 0.0)
  return rows_out, cols_out, both_out


def inside_position(g: dict[str, Array], fold: Array, kk: Array, lane: Array, k: Array,
                    width: Array, cols: int) -> Array:
  """Index of the word at `(fold, kk, lane)` among the prefetch matrix's words
  that lie inside the input (SCALE-Sim's lines skip the `-1` words).

  The fold holds `k` rows of `width` words (`cols` in a full fold).

  Only the last output row (column) of a side whose stride does not divide
  `H - R` reads past the input, for kernel rows `r >= vr` (columns
  `c >= vc`), `vr = H - (out_h - 1) s`.
  """
  kh, kw, ch_n = g["kernel_h"], g["kernel_w"], g["channels"]
  vr, vc = _edges(g)
  block = kw * ch_n
  r = jnp.floor(kk / block)
  within = kk - r * block
  rows_out, cols_out, both_out = _outside_before(g, kk)
  first = fold * cols
  a0, b0, ab0 = _range_counts(g, 0.0 * first, first)
  before = (k * first - a0 * (kh - vr) * block - b0 * (kw - vc) * kh * ch_n
            + ab0 * (kh - vr) * (kw - vc) * ch_n)
  af, bf, abf = _range_counts(g, first, first + width)
  rows_before = kk * width - af * rows_out - bf * cols_out + abf * both_out
  al, bl, abl = _range_counts(g, first, first + lane)
  out_r, out_c = r >= vr, jnp.floor(within / ch_n) >= vc
  lanes_before = lane - al * out_r - bl * out_c + abl * (out_r & out_c)
  return before + rows_before + lanes_before


def weight_stationary_position(g: dict[str, Array], fold: Array, pixel: Array, lane: Array,
                               m: Array, width: Array, rows: Array) -> Array:
  """Index of the word at `(fold, pixel, lane)` among the inside words of a
  weight-stationary ifmap's folds (before SCALE-Sim rolls them out).

  Fold `f` holds the `m` pixels' im2col columns `f rows ... f rows + width -
  1`, one pixel a row; `lane` counts columns within the fold.
  """
  kk0 = fold * rows
  ro0, co0, bo0 = _outside_before(g, kk0)
  a, b, ab = _range_counts(g, 0.0 * m, m)
  before = m * kk0 - a * ro0 - b * co0 + ab * bo0
  ro1, co1, bo1 = _outside_before(g, kk0 + width)
  ap, bp, abp = _range_counts(g, 0.0 * pixel, pixel)
  rows_before = (pixel * width - ap * (ro1 - ro0) - bp * (co1 - co0)
                 + abp * (bo1 - bo0))
  rol, col, bol = _outside_before(g, kk0 + lane)
  _, oh, ow = output_pixel(pixel, g)
  lr, lc = oh >= g["out_h"] - 1.0, ow >= g["out_w"] - 1.0
  lanes_before = (lane - lr * (rol - ro0) - lc * (col - co0)
                  + (lr & lc) * (bol - bo0))
  return before + rows_before + lanes_before


def weight_stationary_span(g: dict[str, Array], fold: Array, m: Array, width: Array,
                           rows: Array) -> tuple[Array, Array]:
  """SCALE-Sim's diagonals of a weight-stationary fold's first and last inside words.

  Fold `f` holds rows `f m ... f m + m - 1` of the stack, one pixel a row,
  and its im2col columns `kk0 = f rows ... kk0 + width - 1`. A pixel off the
  last output row and column reads all of them; one on the last row
  (column) only those of kernel rows `r < vr` (columns `c < vc`), so the
  fold's words end (and may begin) on the diagonal of a pixel of another
  kind than the last (first).
  """
  vr, vc = _edges(g)
  ch_n, block = g["channels"], g["kernel_w"] * g["channels"]
  ho, wo, hw = g["out_h"], g["out_w"], g["out_h"] * g["out_w"]
  kk0 = fold * rows
  inf = jnp.float32(jnp.inf)

  def first(lr, lc):
    r = jnp.floor(kk0 / block)
    x = jnp.where(lc & (kk0 - r * block >= vc * ch_n), (r + 1.0) * block, kk0)
    ok = (x < kk0 + width) & ~(lr & (x >= vr * block)) & ~(lc & (vc <= 0.0))
    return jnp.where(ok, x - kk0, inf)

  def last(lr, lc):
    x = kk0 + width - 1.0
    x = jnp.where(lr, jnp.minimum(x, vr * block - 1.0), x)
    r = jnp.floor(x / block)
    x = jnp.where(lc & (x - r * block >= vc * ch_n), r * block + vc * ch_n - 1.0, x)
    ok = (x >= kk0) & ~(lc & (vc <= 0.0))
    return jnp.where(ok, x - kk0, -inf)

  t, f_ = True, False
  rows2, cols2 = ho >= 2.0, wo >= 2.0
  # (first pixel, last pixel, whether the kind exists) of each kind.
  kinds = (((0.0, m - 2.0 - wo, rows2 & cols2), (f_, f_)),
           ((wo - 1.0, m - 1.0 - wo, rows2), (f_, t)),
           (((ho - 1.0) * wo, m - 2.0, cols2), (t, f_)),
           ((hw - 1.0, m - 1.0, True), (t, t)))
  lo, hi = inf, -inf
  for (p0, p1, exists), (lr, lc) in kinds:
    lo = jnp.minimum(lo, jnp.where(exists, p0 + first(lr, lc), inf))
    hi = jnp.maximum(hi, jnp.where(exists, p1 + last(lr, lc), -inf))
  return fold * m + lo, fold * m + hi


def stack_diagonals(g: dict[str, Array], d: Array, m: Array, folds: Array, last: Array,
                    rows: int, below: Array | None = None, dataflow: str = "ws") -> Array:
  """Inside words of a rolled ifmap on SCALE-Sim's diagonals before `d`.

  Weight stationary (`dataflow='ws'`): SCALE-Sim stacks the folds (`m` rows
  each, `rows` words wide, the last `last` wide) and reads the stack out
  diagonal by diagonal, each from its highest row down: the words before
  diagonal `d` are those of row `R` and column `c` with `R + c < d`, and
  with `below`, also those of diagonal `d` in the rows after it (the words
  before `(below, d - below)`).

  `dataflow='os'`: an output-stationary ifmap, whose folds SCALE-Sim stacks
  and reads out the same way with the roles swapped: a fold's `m` rows are
  the im2col columns, its `rows` words the pixels `fold rows ...`.
  """
  x_ = lambda v: jnp.asarray(v, jnp.float32)[..., None]
  g = {name: x_(v) for name, v in g.items()}
  d, m, folds, last = x_(d), x_(m), x_(folds), x_(last)
  below = jnp.float32(jnp.inf) if below is None else x_(below)
  total = folds * m
  r0 = jnp.clip(d - rows + 1.0, 0.0, total)

  def position(r, q):
    f = jnp.minimum(jnp.floor(r / m), folds - 1.0)
    w = jnp.where(f >= folds - 1.0, last, float(rows))
    if dataflow == "os":
      return inside_position(g, f, r - f * m, jnp.minimum(q, w), m, w, rows)
    return weight_stationary_position(g, f, r - f * m, jnp.minimum(q, w), m, w,
                                      float(rows))

  # Whole rows before `r0` (all of them when `r0` is past the stack).
  full = jnp.where(r0 >= total, position(total - 1.0, float(rows)), position(r0, 0.0))
  r = r0 + jnp.arange(rows, dtype=jnp.float32)
  on = jnp.where(r > below, 1.0, 0.0)
  part = position(r, d - r + on) - position(r, 0.0)
  part = jnp.where((r < d + on) & (r < total), part, 0.0)
  return full[..., 0] + part.sum(axis=-1)


# Tile rows looked up at once: a move looks the words after it up again.
CHUNK_ROWS = 8



def nearest_copy(g: dict[str, Array], s: Array, img: Array, y: Array, x: Array, ch: Array,
                 position: Callable[[Array, Array], Array], start: Array,
                 buffer: tuple[Array, Array, Array, Array]) -> Array:
  """The fewest window moves that bring in a copy of input word `(img, y, x, ch)`.

  The copies are the im2col entries of the output pixels `(oh - u, ow - v)`
  that read the word at kernel offset `(r + u s, c + v s)` (module
  docstring), for both stationary dataflows.

  Args:
    g: the conv geometry (broadcast as the other arguments).
    s: the stride (at least 1).
    img, y, x, ch: the word: image, input row, column and channel.
    position: `(p2, kk2) -> ` the prefetch-stream position of the im2col
      entry of output pixel `p2` and column `kk2` (the dataflow's layout).
    start: the window's first line.
    buffer: the read buffer's `(e, a, step, lines)` (`systolic_memory`).

  Returns:
    The moves, shaped as the broadcast arguments: `inf` where no copy is
    inside the kernel and the output.
  """
  e, a, step, lines = buffer
  kw, ch_n = g["kernel_w"], g["channels"]
  nv = jnp.ceil(kw / s)
  copies = jnp.ceil(g["kernel_h"] / s) * nv

  def body(state):
    q, best = state
    u = jnp.floor(q / nv)
    v = q - u * nv
    oh2, ow2 = jnp.floor(y / s) - u, jnp.floor(x / s) - v
    r2, c2 = y - oh2 * s, x - ow2 * s
    ok = ((q < copies) & (oh2 >= 0.0) & (oh2 < g["out_h"]) & (ow2 >= 0.0)
          & (ow2 < g["out_w"]) & (r2 < g["kernel_h"]) & (c2 < kw))
    p2 = (img * g["out_h"] + oh2) * g["out_w"] + ow2
    pos = position(p2, (r2 * kw + c2) * ch_n + ch)
    d = jnp.mod(jnp.floor(pos / e) - start, lines)
    need = jnp.where(d < a, 0.0, jnp.ceil((d - a + 1.0) / step))
    return q + 1.0, jnp.where(ok, jnp.minimum(best, need), best)

  best = jnp.full(jnp.broadcast_shapes(y.shape, start.shape), jnp.inf)
  _, best = jax.lax.while_loop(lambda st: st[0] < jnp.max(copies), body,
                               (jnp.float32(0.0), best))
  return best

def tile_needs(g: dict[str, Array], words: dict[str, Array], top: Array, count: Array,
               fold: Array, j: Array, rows: int, cols: int, row0: Array = 0.0) -> Array:
  """Moves each word of `rows` rows of a reversed tile needs from `j` moves.

  Args:
    g: `Layers.conv_geometry` (arrays broadcasting with the others, shape
      `B`; the stride known).
    words: the operand's `k`, `folds`, `last` and its buffer's `e`, `a`,
      `step`, `lines` (`systolic_memory.read_buffer`).
    top: the tile's highest im2col row (demanded first).
    count: the tile's rows.
    fold: the tile's fold.
    j: window moves so far (the window starts at line `j * step mod lines`).
    rows, cols: rows looked up, and the array's columns (pixels of a full
      fold).
    row0: the first row looked up, counted from `top` (demand order).

  Returns:
    `[*B, rows * cols]` in demand order (rows `top - row0, top - row0 - 1,
    ...`, each row's pixels left to right): the fewest further moves that bring a copy
    of the word into the window (0 for a word not demanded).
  """
  x_ = lambda v: jnp.asarray(v, jnp.float32)[..., None, None]
  g = {name: x_(v) for name, v in g.items()}
  k, folds, last = x_(words["k"]), x_(words["folds"]), x_(words["last"])
  e, a, step, lines = (x_(words[n]) for n in ("e", "a", "step", "lines"))
  fold, start = x_(fold), x_(j) * step
  idx = x_(row0) + jnp.arange(rows, dtype=jnp.float32)[:, None]
  kk = x_(top) - idx
  s = jnp.where(g["stride"] > 0.0, g["stride"], 1.0)
  kw, ch_n = g["kernel_w"], g["channels"]
  lane = jnp.arange(cols, dtype=jnp.float32)
  width = jnp.where(fold >= folds - 1.0, last, float(cols))
  img, oh, ow = output_pixel(fold * cols + lane, g)
  r = jnp.floor(kk / (kw * ch_n))
  rest = kk - r * kw * ch_n
  c = jnp.floor(rest / ch_n)
  ch = rest - c * ch_n
  y, x = oh * s + r, ow * s + c
  demanded = (idx < x_(count)) & (lane < width) & (y < g["in_h"]) & (x < g["in_w"])

  def position(p2, kk2):
    f2 = jnp.floor(p2 / cols)
    w2 = jnp.where(f2 >= folds - 1.0, last, float(cols))
    return inside_position(g, f2, kk2, p2 - f2 * cols, k, w2, cols)

  best = nearest_copy(g, s, img, y, x, ch, position, start, (e, a, step, lines))
  needs = jnp.where(demanded & jnp.isfinite(best), best, 0.0)
  return needs.reshape(needs.shape[:-2] + (rows * cols,))


def demand_moves(needs: Callable[[Array, Array, int], Array], count: Array, active: Array,
                 j: Array, chunk: int, width: int) -> tuple[Array, Array]:
  """Window moves over a demand of `count` rows of `width` words, in order.

  The words are looked up `chunk` rows at a time (`needs(j, row0, chunk)`:
  `[*B, chunk * width]`, the further moves each word of rows `row0 ...`
  needs from `j` moves): the first one without a copy in the window moves
  it, and the words after it are looked up again. Entries where `active`
  is False keep `j`.

  Returns:
    `(moves, row)`: the moves after the demand, and its row (0 for the
    first) that made the last of them (0 without moves).
  """
  flat = jnp.arange(chunk * width)

  def look(state):
    jj, pos, on, last = state
    row0 = pos // width
    need = needs(jj, row0.astype(jnp.float32), chunk)
    index = row0[..., None] * width + flat
    need = jnp.where(index >= pos[..., None], need, 0.0)
    miss = need > 0.0
    first = jnp.argmax(miss, axis=-1)
    moved = on & miss.any(axis=-1)
    by = jnp.take_along_axis(need, first[..., None], axis=-1)[..., 0]
    hit = row0 * width + first
    pos = jnp.where(moved, hit + 1, (row0 + chunk) * width)
    on = on & (moved | ((row0 + chunk).astype(jnp.float32) < count))
    return (jj + jnp.where(moved, by, 0.0), pos, on,
            jnp.where(moved, (hit // width).astype(jnp.float32), last))

  shape = jnp.broadcast_shapes(jnp.shape(j), jnp.shape(active), jnp.shape(count))
  start = (jnp.broadcast_to(j, shape), jnp.zeros(shape, jnp.int32),
           jnp.broadcast_to(active, shape), jnp.zeros(shape, jnp.float32))
  j_end, _, _, row = jax.lax.while_loop(lambda st: jnp.any(st[2]), look, start)
  return j_end, row


def tile_moves(g: dict[str, Array], words: dict[str, Array], fold: Array, top: Array,
               count: Array, active: Array, j: Array, rows: int,
               cols: int) -> tuple[Array, Array]:
  """Window moves over one reversed tile of `count` im2col rows `top, top - 1, ...`.

  The words are looked up in demand order (`demand_moves`). Entries where
  `active` is False keep `j`.

  Returns:
    `(moves, row)`: the moves after the tile, and the tile's demand row
    (0 for its first) that made the last of them (0 without moves).
  """

  def needs(jj, row0, chunk):
    return tile_needs(g, words, top, count, fold, jj, chunk, cols, row0)

  return demand_moves(needs, count + 0.0 * top, active, j, min(rows, CHUNK_ROWS), cols)
