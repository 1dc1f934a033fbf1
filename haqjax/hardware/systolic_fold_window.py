"""SCALE-Sim's read window over a rolled im2col ifmap, address by address.

Weight stationary (SCALE-Sim's `systolic_compute_ws`) stacks the ifmap's
folds (fold `f` holds the `m` pixels' im2col columns `f rows ... f rows +
w - 1`, one pixel a row, `rows` words wide) and rolls the stack out diagonal
by diagonal: diagonal `d` holds the words of stack row `R` and column `c`
with `R + c = d`, highest row first; the read buffer's lines skip the `-1`
words of the outputs that read past the input. The array demands fold `f`
diagonal by diagonal too: at demand row `rows + t` it reads the words of
fold rows `t - c` at columns `c = 0, 1, ...`, the fold's own part of stack
diagonal `f m + t`. Output stationary (`systolic_compute_os`) stacks and
rolls its ifmap folds the same way with the roles swapped: fold `f` holds
the `k` im2col columns as rows, each `rows` pixels `f rows ...` wide, and at
demand row `t` the array reads column `t - c` of pixel `f rows + c`.

A conv with a kernel over its stride reads each input word several times,
and SCALE-Sim's `read_buffer.active_buffer_hit` finds a demanded address in
any line of the window: a copy of the word elsewhere (kernel row `r - s`,
the pixel one output row below) may serve it, and the window moves only for
an address none of whose copies it holds, by as many prefetches as bring
the nearest copy in. `fold_moves` follows this over one fold's demand,
`CHUNK_DIAGONALS` diagonals at a time (`systolic_window.demand_moves`).

References:
  scalesim-project/scale-sim-v2, `scalesim/memory/read_buffer.py`,
  `scalesim/compute/operand_matrix.py`, `systolic_compute_ws.py`,
  `systolic_compute_os.py`.
"""

from __future__ import annotations

import jax.numpy as jnp

from haqjax.hardware import systolic_window
from haqjax.typing import Array

# Diagonals looked up at once: a move looks the words after it up again.
CHUNK_DIAGONALS = 32


def stack_position(g: dict[str, Array], row: Array, col: Array, m: Array, folds: Array,
                   last: Array, rows: int, gapless: bool = False,
                   dataflow: str = "ws") -> Array:
  """Index of stack word `(row, col)` among the inside words of SCALE-Sim's
  rolled-out ifmap (`dataflow` 'ws' or 'os'; arrays broadcasting with `g`'s).

  `gapless`: no output reads past the input, so every stack word is inside
  (`gapless_position`, a closed form).
  """
  if gapless:
    return gapless_position(row, col, m, folds, last, rows)
  return systolic_window.stack_diagonals(g, row + col, m, folds, last, rows,
                                                     below=row, dataflow=dataflow)


def gapless_position(row: Array, col: Array, m: Array, folds: Array, last: Array,
                     rows: int) -> Array:
  """`stack_position` of a stack without `-1` words.

  The stack's rows `R < (folds - 1) m` are `rows` words wide, the others
  `last`. The words before `(row, col)` on diagonal `d = row + col` are those
  of `R + c < d`, `sum_R clip(d - R, 0, width(R))`, and those of diagonal `d`
  in the rows after `row` (read first: highest row first).
  """
  d = row + col
  split, total = (folds - 1.0) * m, folds * m

  def ramp(n, w):
    # sum_{t=1..n} clip(t, 0, w), 0 for n <= 0.
    n = jnp.maximum(n, 0.0)
    return jnp.where(n <= w, n * (n + 1.0) / 2.0, w * (w + 1.0) / 2.0 + (n - w) * w)

  def band(r0, r1, w):
    # Words of rows [r0, r1) before diagonal `d`, and those of diagonal `d`
    # in rows (row, r1).
    before = ramp(d - r0, w) - ramp(d - r1, w)
    lo = jnp.maximum(jnp.maximum(row + 1.0, d - w + 1.0), r0)
    hi = jnp.minimum(d, r1 - 1.0)
    return before + jnp.maximum(hi - lo + 1.0, 0.0)

  return band(0.0, split, float(rows)) + band(split, total, last)


def fold_needs(g: dict[str, Array], words: dict[str, Array], fold: Array, j: Array,
               diag0: Array, diagonals: int, rows: int, gapless: bool = False,
               dataflow: str = "ws") -> Array:
  """Moves each demanded word of `diagonals` diagonals of a fold needs from `j` moves.

  Args:
    g: `Layers.conv_geometry` (shape `B`, the stride known).
    words: the ifmap's `m` (the fold's height: pixels, for 'os' im2col
      columns), `folds`, `last` (the last fold's width) and its buffer's
      `e`, `a`, `step`, `lines`.
    fold: the fold demanded.
    j: window moves so far.
    diag0: the fold's first diagonal looked up (demand row `rows + diag0`,
      for 'os' `diag0`).
    diagonals, rows: diagonals looked up, and the array's rows.
    gapless: no output of the conv reads past its input (`stack_position`).
    dataflow: 'ws' or 'os' (module docstring).

  Returns:
    `[*B, diagonals * rows]` in demand order (each diagonal's columns left
    to right): the fewest further moves that bring a copy of the word into
    the window (0 for a word not demanded).
  """
  x_ = lambda v: jnp.asarray(v, jnp.float32)[..., None, None]
  g = {name: x_(v) for name, v in g.items()}
  m, folds, last = x_(words["m"]), x_(words["folds"]), x_(words["last"])
  e, a, step, lines = (x_(words[n]) for n in ("e", "a", "step", "lines"))
  fold, start = x_(fold), x_(j) * step
  t = x_(diag0) + jnp.arange(diagonals, dtype=jnp.float32)[:, None]
  c = jnp.arange(rows, dtype=jnp.float32)
  width = jnp.where(fold >= folds - 1.0, last, float(rows))
  p = t - c
  s = jnp.where(g["stride"] > 0.0, g["stride"], 1.0)
  kw, ch_n = g["kernel_w"], g["channels"]
  if dataflow == "os":
    # Row `p` of the fold is im2col column `kk`, lane `c` pixel `fold rows + c`.
    kk, pixel = jnp.clip(p, 0.0, m - 1.0), fold * rows + c
  else:
    kk, pixel = fold * rows + c, jnp.clip(p, 0.0, m - 1.0)
  r = jnp.floor(kk / (kw * ch_n))
  rest = kk - r * kw * ch_n
  cc = jnp.floor(rest / ch_n)
  ch = rest - cc * ch_n
  img, oh, ow = systolic_window.output_pixel(pixel, g)
  y, x = oh * s + r, ow * s + cc
  demanded = ((c < width) & (p >= 0.0) & (p < m) & (y < g["in_h"]) & (x < g["in_w"]))

  def position(p2, kk2):
    if dataflow == "os":
      f2 = jnp.floor(p2 / rows)
      return stack_position(g, f2 * m + kk2, p2 - f2 * rows, m, folds, last, rows, gapless,
                            dataflow)
    f2 = jnp.floor(kk2 / rows)
    return stack_position(g, f2 * m + p2, kk2 - f2 * rows, m, folds, last, rows, gapless)

  best = systolic_window.nearest_copy(g, s, img, y, x, ch, position, start,
                                      (e, a, step, lines))
  needs = jnp.where(demanded & jnp.isfinite(best), best, 0.0)
  return needs.reshape(needs.shape[:-2] + (diagonals * rows,))


def fold_moves(g: dict[str, Array], words: dict[str, Array], fold: Array, active: Array,
               j: Array, rows: int, gapless: bool = False,
               dataflow: str = "ws") -> tuple[Array, Array]:
  """Window moves over one fold's demand (module docstring; `dataflow` 'ws'
  or 'os').

  Entries where `active` is False keep `j`; `gapless`: every active entry's
  conv reads inside its input (the faster `gapless_position`).

  Returns:
    `(moves, diagonal)`: the moves after the fold, and the fold's diagonal
    (demand row `rows + diagonal`) that made the last of them (0 without
    moves).
  """
  width = jnp.where(fold >= words["folds"] - 1.0, words["last"], float(rows))
  count = words["m"] + width - 1.0

  def needs(jj, diag0, chunk):
    return fold_needs(g, words, fold, jj, diag0, chunk, rows, gapless, dataflow)

  return systolic_window.demand_moves(needs, count, active, j, CHUNK_DIAGONALS,
                                     rows)
