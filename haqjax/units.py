"""Costs in the units a person reads: 73.4 µs, 1.25 mJ, 12.0 KiB, 3.40 GBitOps.

Results files keep every cost as its raw SI value (seconds, joules, bytes,
bit-ops, cycles, as `haqjax.hardware.base.UNITS` names them); reports, plots
and command-line summaries format them here, so all of them show one value
the same way. The prefix is chosen from the largest value shown, so a table
column (`format_costs`) or a plot axis (`scale`) reads in one unit, and a
single value (`format_cost`) in its own.

Seconds, joules and watts get the small prefixes (m, µ, n: a latency of
7.3e-05 s is 73.0 µs and stays in s from 1 s up); bytes get the binary ones
(KiB, MiB, GiB, TiB); bit-ops, cycles and any other unit the decimal large
ones (k, M, G, T). This module imports nothing outside the standard library,
so code that must not pull in JAX can use it.

    >>> format_cost(7.3e-05, "s")
    '73.0 µs'
    >>> format_cost(3.4e9, "bit-ops")
    '3.40 GBitOps'
    >>> format_costs([2048.0, 512.0], "bytes")
    ('KiB', ['2.00', '0.500'])
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# (factor, prefix): multiply a value by factor to express it in prefix + unit.
SMALL = ((1.0, ""), (1e3, "m"), (1e6, "\u00b5"), (1e9, "n"))
LARGE = ((1.0, ""), (1e-3, "k"), (1e-6, "M"), (1e-9, "G"), (1e-12, "T"))
BINARY = ((1.0, ""), (2.0 ** -10, "Ki"), (2.0 ** -20, "Mi"), (2.0 ** -30, "Gi"),
          (2.0 ** -40, "Ti"))

# Unit as results.json writes it -> (unit as shown, its prefixes).
_UNITS = {
    "s": ("s", SMALL), "J": ("J", SMALL), "W": ("W", SMALL),
    "bytes": ("B", BINARY), "B": ("B", BINARY),
    "bit-ops": ("BitOps", LARGE), "bitops": ("BitOps", LARGE),
    "cycles": ("cycles", LARGE),
}
NOT_AVAILABLE = "n/a"


def _finite(values: Iterable[float | None]) -> list[float]:
  out = []
  for v in values:
    if v is not None and math.isfinite(float(v)) and float(v) != 0.0:
      out.append(abs(float(v)))
  return out


def scale(unit: str, values: Iterable[float | None]) -> tuple[float, str]:
  """The prefixed unit in which the largest |value| reads best.

  Small prefixes (s, J, W): the first, from the base unit down, that shows the
  largest |value| as >= 1. Large and binary ones: the largest that keeps it
  >= 1. None, zero and non-finite values are ignored; with none left, the
  base unit.

  Args:
    unit: the unit of `values` as results.json writes it ("s", "J", "bytes",
      "bit-ops", "cycles", ...).
    values: the raw values to be shown.

  Returns:
    `(factor, label)`: multiply values by `factor` to express them in `label`,
    e.g. `(1e6, "µs")`.
  """
  shown, prefixes = _UNITS.get(unit, (unit, LARGE))
  v = _finite(values)
  if not v:
    return 1.0, shown
  top = max(v)
  if prefixes is SMALL:
    for factor, prefix in prefixes:
      if top * factor >= 1.0:
        return factor, prefix + shown
    factor, prefix = prefixes[-1]
    return factor, prefix + shown
  best = prefixes[0]
  for factor, prefix in prefixes:
    if top * factor >= 1.0:
      best = (factor, prefix)
  return best[0], best[1] + shown


def format_number(x: float, digits: int = 3) -> str:
  """`x` with `digits` significant digits, in fixed notation (trailing zeros kept).

  Numbers of more than `digits` integer digits keep all of them: 1234.6 -> "1235".
  """
  if not math.isfinite(x):
    return str(x)
  if x == 0:
    return "0"
  decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
  rounded = round(x, decimals)
  # 9.996 rounds to 10.0: one digit more before the point, one fewer after.
  if rounded and math.floor(math.log10(abs(rounded))) > math.floor(math.log10(abs(x))):
    decimals = max(0, decimals - 1)
  return f"{x:.{decimals}f}"


def format_cost(value: float | None, unit: str, digits: int = 3) -> str:
  """One value in its own prefixed unit: `format_cost(7.3e-05, "s")` is "73.0 µs".

  None gives "n/a". A value that rounds up to the next prefix's step
  (999.96 µs) is shown in that prefix (1.00 ms).
  """
  if value is None:
    return NOT_AVAILABLE
  value = float(value)
  factor, label = scale(unit, [value])
  shown, prefixes = _UNITS.get(unit, (unit, LARGE))
  text = format_number(value * factor, digits)
  step = 1024.0 if prefixes is BINARY else 1000.0
  if abs(float(text)) >= step:
    bigger = [f for f, _ in prefixes if f < factor]
    if bigger:
      factor = max(bigger)
      label = dict(prefixes)[factor] + shown
      text = format_number(value * factor, digits)
  return f"{text} {label}"


def format_costs(values: Iterable[float | None], unit: str,
                 digits: int = 3) -> tuple[str, list[str]]:
  """Values of one table column in one prefixed unit.

  Returns:
    `(label, cells)`: the unit for the column's header, e.g. "µs", and each
    value as a number in it ("n/a" for None).
  """
  values = list(values)
  factor, label = scale(unit, values)
  return label, [NOT_AVAILABLE if v is None else format_number(float(v) * factor, digits)
                 for v in values]


def digits_apart(values: Iterable[float | None], unit: str, digits: int = 3,
                 most: int = 6) -> int:
  """The fewest significant digits, from `digits` to `most`, that tell `values` apart.

  Two costs 0.1% apart both read "73.4 µs" at three digits; compared side by
  side they need four, "73.36 µs" and "73.44 µs". Values that are equal stay
  at `digits`.
  """
  values = [float(v) for v in values if v is not None]
  factor, _ = scale(unit, values)
  distinct = len(set(values))
  for d in range(digits, most + 1):
    if len({format_number(v * factor, d) for v in values}) == distinct:
      return d
  return most


def format_delta(value: float | None, unit: str, digits: int = 3) -> str:
  """A signed difference of costs: "-2.70 µs", "+1.20 KiB"."""
  if value is None:
    return NOT_AVAILABLE
  text = format_cost(abs(float(value)), unit, digits)
  return ("-" if value < 0 else "+") + text
