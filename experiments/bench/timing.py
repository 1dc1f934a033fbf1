"""The one timing statistic of the benchmarks: median, min and max after compile.

Every benchmark that reports a time calls `time_call` (or, when it collects
its own samples, e.g. interleaving two implementations, `summarize`): the
first call, which compiles, is timed apart, then at least `MIN_REPEATS`
calls are timed, each until its result is ready, and the median is reported
with the min and the max, so a reader sees the spread as well as the value.

Example:

  t = time_call(lambda: step(state, batch), repeats=20)
  print(f"{t.median_ms:.2f} ms (min {t.min_ms:.2f}, max {t.max_ms:.2f}); "
        f"first call {t.first_seconds:.1f} s")
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import statistics
import time
from typing import Any
from typing import NamedTuple

MIN_REPEATS = 3


class Timing(NamedTuple):
  """Seconds of the timed calls of one function.

  Attributes:
    median: median seconds of the timed calls.
    min: fastest call.
    max: slowest call.
    repeats: how many calls were timed.
    first_seconds: the first call (compilation and one run), timed apart;
      None when the caller had no separate first call.
  """
  median: float
  min: float
  max: float
  repeats: int
  first_seconds: float | None = None

  @property
  def median_ms(self) -> float:
    return 1000 * self.median

  @property
  def min_ms(self) -> float:
    return 1000 * self.min

  @property
  def max_ms(self) -> float:
    return 1000 * self.max

  def to_dict(self, unit: str = "ms", digits: int = 3) -> dict[str, Any]:
    """`{median_<unit>, min_<unit>, max_<unit>, repeats[, first_call_seconds]}`.

    Args:
      unit: 'ms' or 's'.
      digits: decimals kept.
    """
    if unit not in ("ms", "s"):
      raise ValueError(f"unit={unit!r}; allowed: ms, s")
    scale = 1000 if unit == "ms" else 1
    out = {f"{k}_{unit}": round(scale * getattr(self, k), digits)
           for k in ("median", "min", "max")}
    out["repeats"] = self.repeats
    if self.first_seconds is not None:
      out["first_call_seconds"] = round(self.first_seconds, 3)
    return out


def summarize(seconds: Sequence[float], first_seconds: float | None = None) -> Timing:
  """The `Timing` of samples a benchmark collected itself (>= `MIN_REPEATS`)."""
  if len(seconds) < MIN_REPEATS:
    raise ValueError(f"{len(seconds)} timed calls; allowed: >= {MIN_REPEATS}")
  return Timing(median=statistics.median(seconds), min=min(seconds), max=max(seconds),
                repeats=len(seconds), first_seconds=first_seconds)


def _ready(out: Any) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.block_until_ready(out)


def time_call(fn: Callable[[], Any], repeats: int = 10) -> Timing:
  """Times `fn()`: the first call apart, then `repeats` calls.

  Each call is timed until its result (any pytree of JAX arrays, or anything
  else) is ready, so asynchronous dispatch does not hide the work.

  Args:
    fn: the call to time, without arguments.
    repeats: timed calls after the first; at least `MIN_REPEATS`.

  Returns:
    Their median, min and max, and the first call's seconds.
  """
  if repeats < MIN_REPEATS:
    raise ValueError(f"repeats={repeats}; allowed: >= {MIN_REPEATS}")
  t0 = time.perf_counter()
  _ready(fn())
  first = time.perf_counter() - t0
  seconds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _ready(fn())
    seconds.append(time.perf_counter() - t0)
  return summarize(seconds, first)
