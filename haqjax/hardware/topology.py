"""Reads SCALE-Sim topology CSV files (conv and GEMM formats) into `Layers`.

The conv format (one header line, then one layer per line)::

    Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, Num Filter, Strides,
    Conv1, 230, 230, 7, 7, 3, 64, 2,

follows SCALE-Sim's conventions: the IFMAP size is the padded extent, the
output size is `ceil((H - R + s) / s)`, and a layer whose name contains `DP`
is depthwise: SCALE-Sim runs it as `Channels` single-channel layers of
`Num Filter` filters each (so write `Num Filter = 1` for a plain depthwise
conv). A trailing comma is optional; extra columns (SCALE-Sim's sparsity
ratio) are ignored.

The GEMM format (SCALE-Sim's `-i gemm`: a header whose columns after the
name are `M, N, K`)::

    Layer, M, N, K,
    fc1, 128, 64, 256,

multiplies an `M x K` input by a `K x N` matrix; SCALE-Sim runs it as the conv
layer `IFMAP M x K, Filter 1 x K, Channels 1, Num Filter N, Strides 1`, and
so does `read_topology`. A name containing `DP` means nothing in this format.

References:
  A. Samajdar et al., "SCALE-Sim: Systolic CNN Accelerator Simulator",
  arXiv:1811.02883, and scalesim-project/scale-sim-v2.
"""

from __future__ import annotations

import math
import os

from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import make_layers

COLUMNS = ("Layer name", "IFMAP Height", "IFMAP Width", "Filter Height",
           "Filter Width", "Channels", "Num Filter", "Strides")
GEMM_COLUMNS = ("Layer", "M", "N", "K")
FORMATS = ("conv", "gemm")


def _cells(line: str) -> list[str]:
  cells = [c.strip() for c in line.split(",")]
  return cells[:-1] if cells and cells[-1] == "" else cells


def _positive(source: str, n: int, col: str, cell: str) -> int:
  try:
    v = int(cell)
  except ValueError:
    raise ValueError(f"{source}:{n}: {col} is {cell!r}; allowed: a "
                     "positive integer") from None
  if v < 1:
    raise ValueError(f"{source}:{n}: {col} is {v}; allowed: a positive integer")
  return v


def topology_format(text: str) -> str:
  """'gemm' when the header's columns after the name are M, N, K, else 'conv'."""
  lines = [l for l in text.splitlines() if l.strip()]
  head = [c.lower() for c in _cells(lines[0])] if lines else []
  return "gemm" if head[1:4] == ["m", "n", "k"] else "conv"


def parse_gemm_topology(text: str, source: str = "topology") -> list[dict]:
  """Parses GEMM CSV text (`Layer, M, N, K`) into `parse_topology` rows."""
  lines = [l for l in text.splitlines() if l.strip()]
  if not lines:
    raise ValueError(f"{source} is empty; expected a header line and layers")
  rows = []
  for n, line in enumerate(lines[1:], start=2):
    cells = _cells(line)
    if len(cells) < len(GEMM_COLUMNS):
      raise ValueError(f"{source}:{n}: has {len(cells)} fields; expected "
                       f"{len(GEMM_COLUMNS)}: {', '.join(GEMM_COLUMNS)}")
    m, cols, k = (_positive(source, n, col, cell)
                  for col, cell in zip(GEMM_COLUMNS[1:], cells[1:4]))
    rows.append(dict(name=cells[0], in_h=m, in_w=k, kernel_h=1, kernel_w=k,
                     channels=1, filters=cols, stride=1, out_h=m, out_w=1,
                     depthwise=False))
  if not rows:
    raise ValueError(f"{source} has no layers (only a header line)")
  return rows


def parse_topology(text: str, source: str = "topology") -> list[dict]:
  """Parses CSV text into one dict per layer (SCALE-Sim's fields)."""
  rows = []
  lines = [l for l in text.splitlines() if l.strip()]
  if not lines:
    raise ValueError(f"{source} is empty; expected a header line and layers")
  for n, line in enumerate(lines[1:], start=2):
    cells = _cells(line)
    if len(cells) < len(COLUMNS):
      raise ValueError(f"{source}:{n}: has {len(cells)} fields; expected "
                       f"{len(COLUMNS)}: {', '.join(COLUMNS)}")
    values = [_positive(source, n, col, cell)
              for col, cell in zip(COLUMNS[1:], cells[1:len(COLUMNS)])]
    name = cells[0]
    h, w, r, s, c, f, stride = values
    if r > h or s > w:
      raise ValueError(f"{source}:{n}: filter {r}x{s} is larger than the "
                       f"IFMAP {h}x{w}")
    rows.append(dict(name=name, in_h=h, in_w=w, kernel_h=r, kernel_w=s,
                     channels=c, filters=f, stride=stride,
                     out_h=math.ceil((h - r + stride) / stride),
                     out_w=math.ceil((w - s + stride) / stride),
                     depthwise="DP" in name))
  if not rows:
    raise ValueError(f"{source} has no layers (only a header line)")
  return rows


def read_topology(path: str, batch: int = 1, fmt: str | None = None) -> Layers:
  """Reads a SCALE-Sim topology CSV file as `Layers` at `batch`.

  Args:
    path: the CSV file.
    batch: batch size (multiplies `M`).
    fmt: 'conv' or 'gemm'; None: from the header (`topology_format`).

  Returns:
    The `Layers`.

  Raises:
    ValueError: a missing or malformed file, or an unknown `fmt`.
  """
  if fmt is not None and fmt not in FORMATS:
    raise ValueError(f"fmt is {fmt!r}; allowed: {', '.join(FORMATS)}")
  if not os.path.isfile(path):
    raise ValueError(f"topology file {path!r} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"topology file {path!r} cannot be read ({e})") from None
  parse = parse_gemm_topology if (fmt or topology_format(text)) == "gemm" else parse_topology
  return topology_layers(parse(text, path), batch=batch)


def topology_layers(rows: list[dict], batch: int = 1) -> Layers:
  """`Layers` from `parse_topology` rows."""
  dw = [r["depthwise"] for r in rows]
  return make_layers(
      names=[r["name"] for r in rows],
      in_channels=[r["channels"] for r in rows],
      out_channels=[r["channels"] * r["filters"] if d else r["filters"]
                    for r, d in zip(rows, dw)],
      kernel_h=[r["kernel_h"] for r in rows],
      kernel_w=[r["kernel_w"] for r in rows],
      groups=[r["channels"] if d else 1 for r, d in zip(rows, dw)],
      in_h=[r["in_h"] for r in rows], in_w=[r["in_w"] for r in rows],
      out_h=[r["out_h"] for r in rows], out_w=[r["out_w"] for r in rows],
      batch=batch, depthwise=dw, stride=[r["stride"] for r in rows])
