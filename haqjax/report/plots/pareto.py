"""Accuracy against hardware cost: the Pareto front, and one run against uniform.

Uniform-precision points are a joined, labelled reference curve; every other
point (RL, Gumbel, sweep members) enters the mixed-precision Pareto front,
drawn as the best top-1 reachable at each cost. `versus_uniform_figure` is
the small plot of one search's report: its policy beside the uniform policy
its budget refers to (and any other uniform points), the difference marked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from haqjax.report.plots.canvas import as_number
from haqjax.report.plots.canvas import new_figure
from haqjax.report.plots.canvas import unit_scale
from haqjax.report.plots.canvas import write_png

# Marker and colour per point group of a Pareto plot; others cycle below.
_GROUP_STYLE = {
    "uniform": dict(marker="o", color="black"),
    "rl": dict(marker="D", color="#d62728"),
    "gumbel": dict(marker="^", color="#1f77b4"),
    "sweep": dict(marker="s", color="#9467bd"),
}
_MARKERS = ("v", "P", "X", "*", "h", "<", ">")
_COLOURS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def _check_points(points: Sequence[Mapping[str, Any]]) -> None:
  for i, p in enumerate(points):
    for key in ("cost", "top1"):
      if key not in p:
        raise ValueError(f"points[{i}] has no {key!r}; required: cost, top1")
      if not math.isfinite(as_number(f"points[{i}].{key}", p[key])):
        raise ValueError(f"points[{i}].{key} is {p[key]!r}; expected a finite number")


def pareto_front(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The points not dominated in (lower cost, higher top-1), by increasing cost.

  A point is dropped if another has cost <= and top1 >= with one strictly
  better. Of exact ties (same cost and top1) the first in `points` is kept, so
  both cost and top1 strictly increase along the returned front.

  Args:
    points: dicts with numeric "cost" and "top1" (other keys are carried).

  Returns:
    The front's points (the same dict objects), in increasing cost.

  Raises:
    ValueError: if a point lacks a finite "cost" or "top1".
  """
  _check_points(points)
  order = sorted(range(len(points)),
                 key=lambda i: (points[i]["cost"], -points[i]["top1"], i))
  front, best = [], -math.inf
  for i in order:
    if points[i]["top1"] > best:
      front.append(points[i])
      best = points[i]["top1"]
  return front


def pareto_figure(points: Sequence[Mapping[str, Any]], *, metric: str = "latency",
                  unit: str = "s", title: str | None = None,
                  dpi: float = 120) -> Figure:
  """Test top-1 against hardware cost, one marker style per point group.

  Uniform points (group "uniform") are joined in cost order and annotated with
  their labels; the Pareto front of all other points is a step line.

  Args:
    points: dicts {"label", "group", "cost" (in `unit`), "top1" (%)}.
    metric: name of the cost metric, e.g. "latency", "energy", "size".
    unit: unit of "cost"; "s" and "J" are shown as ms/mJ when small.
    title: figure title.
    dpi: dots per inch of the figure.

  Returns:
    The figure, one axes.

  Raises:
    ValueError: on an empty list or a point lacking "group", "cost" or "top1".
  """
  if not points:
    raise ValueError("points is empty; nothing to plot")
  _check_points(points)
  for i, p in enumerate(points):
    if "group" not in p:
      raise ValueError(f"points[{i}] has no 'group' (e.g. 'uniform', 'rl')")
  factor, unit_label = unit_scale(unit, [p["cost"] for p in points])
  fig = new_figure(7.5, 5.0, dpi)
  ax = fig.add_subplot()
  groups = list(dict.fromkeys(p["group"] for p in points))
  others = iter(range(len(groups)))
  for g in groups:
    style = _GROUP_STYLE.get(g)
    if style is None:
      j = next(others)
      style = dict(marker=_MARKERS[j % len(_MARKERS)], color=_COLOURS[j % len(_COLOURS)])
    pts = sorted((p for p in points if p["group"] == g), key=lambda p: p["cost"])
    x = [p["cost"] * factor for p in pts]
    y = [p["top1"] for p in pts]
    ax.plot(x, y, linestyle="-" if g == "uniform" else "none", linewidth=1.0,
            markersize=6 if g != "sweep" else 4, alpha=1.0 if g != "sweep" else 0.6,
            label=g, zorder=3, **style)
    if g == "uniform":
      for p, xi, yi in zip(pts, x, y):
        ax.annotate(str(p.get("label", "")), (xi, yi), xytext=(5, -10),
                    textcoords="offset points", fontsize=8)
  front = pareto_front([p for p in points if p["group"] != "uniform"])
  if front:
    # Best top-1 reachable at each cost: flat until the next front point, and
    # flat after the last one up to the largest cost shown.
    x = [p["cost"] * factor for p in front]
    y = [p["top1"] for p in front]
    x_end = max(p["cost"] for p in points) * factor
    if x_end > x[-1]:
      x, y = x + [x_end], y + [y[-1]]
    ax.plot(x, y, drawstyle="steps-post", color="0.35", linestyle="--",
            linewidth=1.6, label="Pareto front (mixed precision)", zorder=4)
  ax.set_xlabel(f"{metric} ({unit_label})")
  ax.set_ylabel("test top-1 (%)")
  ax.grid(linewidth=0.4, alpha=0.5)
  ax.legend(loc="best", fontsize=8)
  fig.suptitle(title or f"Test top-1 vs {metric}")
  return fig


def plot_pareto(path: str | os.PathLike, points: Sequence[Mapping[str, Any]], *,
                metric: str = "latency", unit: str = "s", title: str | None = None,
                dpi: float = 120) -> str:
  """Writes `pareto_figure(...)` as a PNG at `path`; returns the path."""
  fig = pareto_figure(points, metric=metric, unit=unit, title=title, dpi=dpi)
  return write_png(fig, path, dpi)


def versus_uniform_figure(found: Mapping[str, Any], reference: Mapping[str, Any] | None,
                          uniform: Sequence[Mapping[str, Any]] = (), *,
                          metric: str = "latency", unit: str = "s",
                          limit: float | None = None, title: str | None = None,
                          dpi: float = 120) -> Figure:
  """Test top-1 against cost: a search's policy, its uniform reference, other uniforms.

  Uniform points (the reference and `uniform`, one per label, the reference
  winning) are joined in cost order and labelled; the reference is ringed,
  and an arrow from it to the found policy is labelled with the difference
  in points and the cost ratio.

  Args:
    found: {"label", "cost" (in `unit`), "top1" (%)} of the search's policy.
    reference: the same for the uniform policy its budget refers to, or None.
    uniform: more uniform points {"label", "cost", "top1"}.
    metric: name of the cost metric.
    unit: unit of the costs (SI: "s", "J", "bytes", ...).
    limit: the budget, drawn as a vertical dotted line.
    title: figure title.
    dpi: dots per inch of the figure.

  Returns:
    The figure, one axes.

  Raises:
    ValueError: if a point lacks a finite "cost" or "top1".
  """
  _check_points([found, *([reference] if reference else []), *uniform])
  by_label = {p.get("label"): p for p in uniform}
  if reference is not None:
    by_label[reference.get("label")] = reference
  line = sorted(by_label.values(), key=lambda p: p["cost"])
  costs = [found["cost"], *(p["cost"] for p in line)] + ([limit] if limit else [])
  factor, unit_label = unit_scale(unit, costs)
  fig = new_figure(6.0, 4.2, dpi)
  ax = fig.add_subplot()
  if line:
    ax.plot([p["cost"] * factor for p in line], [p["top1"] for p in line],
            linestyle="-", linewidth=1.0, label="uniform", zorder=3,
            **_GROUP_STYLE["uniform"])
    for p in line:
      ax.annotate(str(p.get("label", "")), (p["cost"] * factor, p["top1"]),
                  xytext=(5, -11), textcoords="offset points", fontsize=8)
  if reference is not None:
    ax.plot([reference["cost"] * factor], [reference["top1"]], linestyle="none",
            marker="o", markersize=13, markerfacecolor="none", markeredgecolor="black",
            markeredgewidth=1.2, label=f"{reference.get('label', 'uniform')} "
            "(budget reference)", zorder=4)
  ax.plot([found["cost"] * factor], [found["top1"]], linestyle="none", marker="D",
          markersize=8, color=_GROUP_STYLE["rl"]["color"],
          label=str(found.get("label", "found policy")), zorder=5)
  if reference is not None:
    delta = found["top1"] - reference["top1"]
    ratio = found["cost"] / reference["cost"] if reference["cost"] else math.nan
    ax.annotate("", xy=(found["cost"] * factor, found["top1"]),
                xytext=(reference["cost"] * factor, reference["top1"]),
                arrowprops=dict(arrowstyle="->", color="0.35", linewidth=1.0))
    ax.annotate(f"{delta:+.2f} pt at {ratio:.3f}x the cost",
                (found["cost"] * factor, found["top1"]), xytext=(6, 6),
                textcoords="offset points", fontsize=8, color="0.2")
  if limit:
    ax.axvline(limit * factor, color="#d62728", linestyle=":", linewidth=1.2,
               label="budget")
  ax.margins(x=0.15, y=0.2)
  ax.set_xlabel(f"{metric} ({unit_label})")
  ax.set_ylabel("test top-1 (%)")
  ax.grid(linewidth=0.4, alpha=0.5)
  ax.legend(loc="best", fontsize=8)
  fig.suptitle(title or f"Test top-1 vs {metric}: found policy and uniform")
  return fig


def plot_versus_uniform(path: str | os.PathLike, found: Mapping[str, Any],
                        reference: Mapping[str, Any] | None,
                        uniform: Sequence[Mapping[str, Any]] = (), *,
                        metric: str = "latency", unit: str = "s",
                        limit: float | None = None, title: str | None = None,
                        dpi: float = 120) -> str:
  """Writes `versus_uniform_figure(...)` as a PNG at `path`; returns the path."""
  fig = versus_uniform_figure(found, reference, uniform, metric=metric, unit=unit,
                              limit=limit, title=title, dpi=dpi)
  return write_png(fig, path, dpi)
