"""Reads SCALE-Sim v2 topology CSV files into `Layers`.

The format (one header line, then one layer per line)::

    Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, Num Filter, Strides,
    Conv1, 230, 230, 7, 7, 3, 64, 2,

follows SCALE-Sim's conventions: the IFMAP size is the padded extent, the
output size is `ceil((H - R + s) / s)`, and a layer whose name contains `DP`
is depthwise: SCALE-Sim runs it as `Channels` single-channel layers of
`Num Filter` filters each (so write `Num Filter = 1` for a plain depthwise
conv). A trailing comma is optional; extra columns (SCALE-Sim's sparsity
ratio) are ignored.

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


def parse_topology(text: str, source: str = "topology") -> list[dict]:
  """Parses CSV text into one dict per layer (SCALE-Sim's fields)."""
  rows = []
  lines = [l for l in text.splitlines() if l.strip()]
  if not lines:
    raise ValueError(f"{source} is empty; expected a header line and layers")
  for n, line in enumerate(lines[1:], start=2):
    cells = [c.strip() for c in line.split(",")]
    if cells and cells[-1] == "":
      cells = cells[:-1]
    if len(cells) < len(COLUMNS):
      raise ValueError(f"{source}:{n}: has {len(cells)} fields; expected "
                       f"{len(COLUMNS)}: {', '.join(COLUMNS)}")
    values = []
    for col, cell in zip(COLUMNS[1:], cells[1:len(COLUMNS)]):
      try:
        v = int(cell)
      except ValueError:
        raise ValueError(f"{source}:{n}: {col} is {cell!r}; allowed: a "
                         "positive integer") from None
      if v < 1:
        raise ValueError(f"{source}:{n}: {col} is {v}; allowed: a positive integer")
      values.append(v)
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


def read_topology(path: str, batch: int = 1) -> Layers:
  """Reads a SCALE-Sim v2 topology CSV file as `Layers` at `batch`."""
  if not os.path.isfile(path):
    raise ValueError(f"topology file {path!r} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"topology file {path!r} cannot be read ({e})") from None
  return topology_layers(parse_topology(text, path), batch=batch)


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
      batch=batch, depthwise=dw)
