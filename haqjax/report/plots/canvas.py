"""What every report figure shares: an Agg canvas, atomic PNGs, unit prefixes.

Figures are drawn with `Figure` + `FigureCanvasAgg` directly, never through
`pyplot`, so a backend the user has chosen is left alone and no figure is kept
alive by a global registry. The layout is `constrained`, so long labels shrink
the axes, not the canvas; a PNG is `fig.get_size_inches() * dpi` pixels (no
tight bounding box).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from haqjax import io as haq_io
from haqjax import units


def write_png(fig: Figure, path: str | os.PathLike, dpi: float) -> str:
  """Renders `fig` to `path` through Agg; temporary file + os.replace."""
  FigureCanvasAgg(fig)  # Attaches itself as fig.canvas (builders do too).
  with haq_io.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  return os.fspath(path)


def new_figure(width: float, height: float, dpi: float) -> Figure:
  """A constrained-layout figure of `width x height` inches on an Agg canvas."""
  fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def unit_scale(unit: str, values: Sequence[float]) -> tuple[float, str]:
  """Chooses a prefixed unit so that the largest |value| reads as 1..999.

  The axes of every plot use the prefixes of reports and summaries
  (`haqjax.units.scale`): seconds, joules and watts are scaled down
  (0.004 s -> 4 ms), bytes up in binary steps (3.2e6 bytes -> 3.05 MiB),
  bit-ops and cycles up in decimal ones (5e9 bit-ops -> 5 GBitOps).

  Args:
    unit: the unit of `values`, e.g. "s", "J", "bytes", "bit-ops".
    values: the numbers to be shown (None and non-finite ones are ignored).

  Returns:
    `(factor, label)`: multiply values by `factor` to express them in `label`.
  """
  return units.scale(unit, values)


def short_name(name: str, width: int = 24) -> str:
  """`name`, or its last `width - 1` characters after an ellipsis."""
  return name if len(name) <= width else "\u2026" + name[-(width - 1):]


def as_number(source: str, value: Any) -> float:
  """`value` as a float; a `ValueError` naming `source` for a non-number."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"{source} is {value!r}; expected a number")
  return float(value)
