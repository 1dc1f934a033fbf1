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

# Unit prefixes: (factor, prefix). Small-value prefixes only for units where
# they are customary (seconds, joules, watts); large ones for counts and bytes.
_SMALL_PREFIXES = ((1e3, "m"), (1e6, "\u00b5"), (1e9, "n"))
_LARGE_PREFIXES = ((1e-3, "k"), (1e-6, "M"), (1e-9, "G"), (1e-12, "T"))
_SMALL_UNITS = ("s", "J", "W")


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

  Seconds, joules and watts are scaled down (0.004 s -> 4 ms); other units are
  scaled up when large (3.2e6 B -> 3.2 MB, 5e9 bitops -> 5 Gbitops).

  Args:
    unit: the unit of `values`, e.g. "s", "J", "B", "bitops".
    values: the numbers to be shown (non-finite ones are ignored).

  Returns:
    `(factor, label)`: multiply values by `factor` to express them in `label`.
  """
  v = np.abs(np.asarray([x for x in values if x is not None], dtype=float))
  v = v[np.isfinite(v) & (v > 0)]
  if not v.size:
    return 1.0, unit
  top = float(v.max())
  if unit in _SMALL_UNITS and top < 1.0:
    for factor, prefix in _SMALL_PREFIXES:
      if top * factor >= 1.0 or prefix == _SMALL_PREFIXES[-1][1]:
        return factor, prefix + unit
  if unit not in _SMALL_UNITS and top >= 1e3:
    for factor, prefix in reversed(_LARGE_PREFIXES):
      if top * factor >= 1.0:
        return factor, prefix + unit
  return 1.0, unit


def short_name(name: str, width: int = 24) -> str:
  """`name`, or its last `width - 1` characters after an ellipsis."""
  return name if len(name) <= width else "\u2026" + name[-(width - 1):]


def as_number(source: str, value: Any) -> float:
  """`value` as a float; a `ValueError` naming `source` for a non-number."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"{source} is {value!r}; expected a number")
  return float(value)
