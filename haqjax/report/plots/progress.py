"""The search-progress figure: reward, accuracy and cost per episode.

Warm-up episodes (random policies before the agent learns) are shaded, the
best reward so far is a line, and the cost panel shows the budget and an
optional reference network (e.g. uniform W4A4) as horizontal lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from haqjax.report.plots.canvas import as_number
from haqjax.report.plots.canvas import new_figure
from haqjax.report.plots.canvas import unit_scale
from haqjax.report.plots.canvas import write_png


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """[start, stop) index ranges where `mask` is True."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return list(zip(edges[::2], edges[1::2]))


def search_progress_figure(episodes: Sequence[Mapping[str, Any]], *,
                           budget: Mapping[str, Any] | None = None,
                           reference: Mapping[str, Any] | None = None,
                           title: str | None = None, dpi: float = 120) -> Figure:
  """Reward and cost per search episode, warm-up episodes marked.

  Args:
    episodes: dicts with "episode", "reward", "cost" (in the budget metric's
      unit); optional "best_reward" (else the running maximum is drawn),
      "warmup" (bool) and "val_top1" (%; adds a middle panel).
    budget: {"metric", "unit", "limit" (absolute), optional "label"}; without
      "limit" only the axis label uses it.
    reference: {"label": "W4A4", "cost": float}, drawn as a dashed line.
    title: figure title.
    dpi: dots per inch of the figure.

  Without a budget the cost axis is labelled "cost" with no unit.

  Returns:
    The figure; `fig.axes[0]` is the reward, `fig.axes[-1]` the cost panel.

  Raises:
    ValueError: on an empty list or an episode missing a required key.
  """
  if not episodes:
    raise ValueError("episodes is empty; nothing to plot")
  for i, e in enumerate(episodes):
    for key in ("episode", "reward", "cost"):
      if key not in e:
        raise ValueError(f"episodes[{i}] has no {key!r}; required: episode, "
                         "reward, cost")
  eps = sorted(episodes, key=lambda e: e["episode"])
  ep = np.array([e["episode"] for e in eps], dtype=float)
  reward = np.array([as_number("reward", e["reward"]) for e in eps])
  cost = np.array([as_number("cost", e["cost"]) for e in eps])
  reward[~np.isfinite(reward)] = np.nan
  warm = np.array([bool(e.get("warmup", False)) for e in eps])
  if all("best_reward" in e for e in eps):
    best = np.array([as_number("best_reward", e["best_reward"]) for e in eps])
  else:
    best = np.fmax.accumulate(reward)
  has_val = any("val_top1" in e for e in eps)

  budget = dict(budget or {})
  metric, unit = budget.get("metric", "cost"), budget.get("unit", "")
  limit = budget.get("limit")
  lines = [v for v in (limit, (reference or {}).get("cost")) if v is not None]
  factor, unit_label = unit_scale(unit, list(cost) + lines)

  nrows = 3 if has_val else 2
  fig = new_figure(8.0, 2.6 * nrows + 0.6, dpi)
  axes = fig.subplots(nrows, 1, sharex=True)
  ax_r, ax_c = axes[0], axes[-1]
  for ax in axes:
    for j, (start, stop) in enumerate(_runs(warm)):
      ax.axvspan(ep[start] - 0.5, ep[stop - 1] + 0.5, color="0.9", zorder=0,
                 label="warm-up" if ax is ax_r and j == 0 else None)
  size = 14 if len(eps) <= 300 else 6
  for sel, colour, suffix in ((warm, "0.55", " (warm-up)"), (~warm, "#1f77b4", "")):
    if sel.any():
      ax_r.scatter(ep[sel], reward[sel], s=size, color=colour,
                   label="reward" + suffix, zorder=2)
      ax_c.scatter(ep[sel], cost[sel] * factor, s=size, color=colour,
                   label=f"{metric}" + suffix, zorder=2)
  ax_r.plot(ep, best, color="#d62728", linewidth=1.5, label="best so far", zorder=3)
  ax_r.set_ylabel("reward (unitless)")
  ax_r.legend(loc="lower right", fontsize=8)
  ax_r.grid(linewidth=0.4, alpha=0.5)

  if has_val:
    ax_v = axes[1]
    val = np.array([e.get("val_top1", np.nan) for e in eps], dtype=float)
    for sel, colour, suffix in ((warm, "0.55", " (warm-up)"), (~warm, "#2ca02c", "")):
      if sel.any():
        ax_v.scatter(ep[sel], val[sel], s=size, color=colour,
                     label="val top-1" + suffix, zorder=2)
    ax_v.set_ylabel("val top-1 (%)")
    ax_v.legend(loc="lower right", fontsize=8)
    ax_v.grid(linewidth=0.4, alpha=0.5)

  if limit is not None:
    text = budget.get("label") or f"budget {limit * factor:.4g} {unit_label}"
    ax_c.axhline(limit * factor, color="#d62728", linewidth=1.5, label=text)
  if reference is not None:
    ax_c.axhline(reference["cost"] * factor, color="black", linestyle="--",
                 linewidth=1.2,
                 label=f"{reference.get('label', 'reference')} "
                       f"({reference['cost'] * factor:.4g} {unit_label})")
  ax_c.set_ylabel(f"{metric} ({unit_label})" if unit_label else metric)
  ax_c.set_xlabel("episode")
  ax_c.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax_c.legend(loc="upper right", fontsize=8)
  ax_c.grid(linewidth=0.4, alpha=0.5)
  fig.suptitle(title or f"Bit-width search: reward and {metric} per episode")
  return fig


def plot_search_progress(path: str | os.PathLike,
                         episodes: Sequence[Mapping[str, Any]], *,
                         budget: Mapping[str, Any] | None = None,
                         reference: Mapping[str, Any] | None = None,
                         title: str | None = None, dpi: float = 120) -> str:
  """Writes `search_progress_figure(...)` as a PNG at `path`; returns the path."""
  fig = search_progress_figure(episodes, budget=budget, reference=reference,
                               title=title, dpi=dpi)
  return write_png(fig, path, dpi)
