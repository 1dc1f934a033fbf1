"""Figures of bit-width searches: policies, search progress, accuracy vs cost.

Every plot comes as a pair: a builder `<name>_figure(...)` that returns a
`matplotlib.figure.Figure` (inspectable in tests and notebooks) and a writer
`plot_<name>(path, ...)` that renders it to a PNG atomically and returns the
path. All inputs are plain Python data (lists, dicts, nested sequences); JAX
is never needed. Figures are drawn with `Figure` + `FigureCanvasAgg` directly,
never through `pyplot`, so a backend the user has chosen is left alone and no
figure is kept alive by a global registry.

    plot_policy_bits("policy.png", json.load(open("layers.json")),
                     json.load(open("policy.json")))

Pixel size of a PNG is `fig.get_size_inches() * dpi` (no tight bounding box);
the layout is `constrained`, so long labels shrink the axes, not the canvas.
Titles are figure titles (`fig.get_suptitle()`); legends sit inside the axes
or outside them below, never over the title.

References:
  Wang, Liu, Lin, Lin, Han. HAQ: Hardware-Aware Automated Quantization with
  Mixed Precision. CVPR 2019. Figures 3 and 5 (per-layer bit-widths, weights
  drawn above and activations below the axis).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import patches as mpatches
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from haqjax import io as haq_io
from haqjax.bitwidths import FLOAT_BITS

KINDS = ("conv", "depthwise", "dense")

# Colour and hatch per layer kind (colour-blind-safe "tab" hues).
_KIND_STYLE = {
    "conv": dict(color="#1f77b4", label="conv (full / pointwise)"),
    "depthwise": dict(color="#ff7f0e", label="depthwise conv"),
    "dense": dict(color="#2ca02c", label="dense"),
}
# Marker and colour per point group of a Pareto plot; others cycle below.
_GROUP_STYLE = {
    "uniform": dict(marker="o", color="black"),
    "rl": dict(marker="D", color="#d62728"),
    "gumbel": dict(marker="^", color="#1f77b4"),
    "sweep": dict(marker="s", color="#9467bd"),
}
_MARKERS = ("v", "P", "X", "*", "h", "<", ">")
_COLOURS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")

# Unit prefixes: (factor, prefix). Small-value prefixes only for units where
# they are customary (seconds, joules, watts); large ones for counts and bytes.
_SMALL_PREFIXES = ((1e3, "m"), (1e6, "\u00b5"), (1e9, "n"))
_LARGE_PREFIXES = ((1e-3, "k"), (1e-6, "M"), (1e-9, "G"), (1e-12, "T"))
_SMALL_UNITS = ("s", "J", "W")


# ----------------------------------------------------------------- helpers


def _write_png(fig: Figure, path: str | os.PathLike, dpi: float) -> str:
  """Renders `fig` to `path` through Agg; temporary file + os.replace."""
  FigureCanvasAgg(fig)  # Attaches itself as fig.canvas (builders do too).
  with haq_io.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  return os.fspath(path)


def _new_figure(width: float, height: float, dpi: float) -> Figure:
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


def _short(name: str, width: int = 24) -> str:
  return name if len(name) <= width else "\u2026" + name[-(width - 1):]


def _number(source: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"{source} is {value!r}; expected a number")
  return float(value)


def _policy_layers(policy: Any) -> list[dict[str, Any]]:
  """The layers list of a policy dict or a `haqjax.policy.Policy`."""
  if hasattr(policy, "to_dict"):
    policy = policy.to_dict()
  if not isinstance(policy, Mapping) or not isinstance(policy.get("layers"), list):
    raise ValueError("policy must be a haqjax.policy.Policy or its dict form "
                     "{'format': 'haqjax.policy/1', 'layers': [...]}")
  for i, layer in enumerate(policy["layers"]):
    if not isinstance(layer, Mapping) or not {"w_bits", "a_bits"} <= set(layer):
      raise ValueError(f"policy layers[{i}] must have 'w_bits' and 'a_bits'")
  return policy["layers"]


# ------------------------------------------------------------ policy bits


def policy_bits_figure(layers: Sequence[Mapping[str, Any]], policy: Any, *,
                       title: str | None = None, dpi: float = 120) -> Figure:
  """Per-layer weight (up) and activation (down) bit-widths, HAQ Fig. 3/5 style.

  Args:
    layers: rows of `layers.json` in forward order ("name", "kind", ...).
    policy: the policy's dict form or a `haqjax.policy.Policy`.
    title: figure title (`fig.get_suptitle()`); the default names the layer
      count and the unweighted mean of the quantized bit-widths.
    dpi: dots per inch of the figure.

  Returns:
    The figure, one axes: x = layer index, y = bits (labels show |y|).

  Raises:
    ValueError: if the policy's layer names or count differ from `layers`, or
      a layer kind is unknown.
  """
  rows = _policy_layers(policy)
  if len(rows) != len(layers):
    raise ValueError(f"policy has {len(rows)} layers; layers has {len(layers)}")
  for i, (row, layer) in enumerate(zip(rows, layers)):
    if "name" in row and row["name"] != layer.get("name"):
      raise ValueError(f"policy layers[{i}].name is {row['name']!r}; "
                       f"layers[{i}].name is {layer.get('name')!r}")
    if layer.get("kind") not in KINDS:
      raise ValueError(f"layers[{i}].kind is {layer.get('kind')!r}; "
                       f"allowed: {', '.join(KINDS)}")
  n = len(layers)
  if not n:
    raise ValueError("layers is empty; nothing to plot")
  w = np.array([int(r["w_bits"]) for r in rows])  # [L]
  a = np.array([int(r["a_bits"]) for r in rows])  # [L]
  kinds = [layer["kind"] for layer in layers]
  names = [str(layer.get("name", i)) for i, layer in enumerate(layers)]
  show_names = n <= 20

  width = min(max(6.5, 1.2 + 0.24 * n), 16.0)
  fig = _new_figure(width, 5.0 + (1.4 if show_names else 0.0), dpi)
  ax = fig.add_subplot()
  x = np.arange(n)
  w_fix, a_fix = w != FLOAT_BITS, a != FLOAT_BITS
  for kind in KINDS:
    sel = np.array([k == kind for k in kinds])
    if not sel.any():
      continue
    colour = _KIND_STYLE[kind]["color"]
    light = mcolors.to_rgba(colour, 0.35)
    ax.bar(x[sel & w_fix], w[sel & w_fix], width=0.8, color=colour,
           edgecolor=colour, linewidth=0.6)
    ax.bar(x[sel & a_fix], -a[sel & a_fix], width=0.8, color=light,
           edgecolor=colour, hatch="////", linewidth=0.6)
  floats = [(x[~w_fix], 0.5), (x[~a_fix], -0.5)]
  for xs, y in floats:
    if xs.size:
      ax.plot(xs, np.full(xs.size, y), linestyle="none", marker="D",
              markersize=6, markerfacecolor="white", markeredgecolor="black")
  ax.axhline(0, color="black", linewidth=0.8)

  finite = np.concatenate([w[w_fix], a[a_fix], [1]])
  top = float(finite.max()) + 0.6
  ax.set_ylim(-top, top)
  ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{abs(v):g}"))
  ax.set_ylabel("bits  (activations \u2193 | weights \u2191)")
  ax.grid(axis="y", linewidth=0.4, alpha=0.5)
  ax.set_xlim(-0.6, n - 0.4)
  if n <= 60:
    ax.set_xticks(x)
    if show_names:
      ax.set_xticklabels([f"{i} {_short(s)}" for i, s in enumerate(names)],
                         rotation=45, ha="right", rotation_mode="anchor",
                         fontsize=8)
    else:
      ax.set_xticklabels([str(i) for i in x], fontsize=8 if n <= 40 else 7)
  else:
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=30, integer=True))
  ax.set_xlabel("layer index (forward order" + (", name)" if show_names else ")"))

  handles = [mpatches.Patch(color=_KIND_STYLE[k]["color"],
                            label=_KIND_STYLE[k]["label"])
             for k in KINDS if k in kinds]
  handles += [
      mpatches.Patch(facecolor="0.45", edgecolor="0.45", label="weight bits (up)"),
      mpatches.Patch(facecolor=mcolors.to_rgba("0.45", 0.35), edgecolor="0.45",
                     hatch="////", label="activation bits (down)"),
  ]
  if (~w_fix).any() or (~a_fix).any():
    handles.append(Line2D([], [], linestyle="none", marker="D", markersize=6,
                          markerfacecolor="white", markeredgecolor="black",
                          label=f"float ({FLOAT_BITS}-bit, not quantized)"))
  # Below the axes, as wide as the figure allows.
  fig.legend(handles=handles, loc="outside lower center", fontsize=8,
             ncols=max(1, min(len(handles), int(width / 2.2))), frameon=False)
  if title is None:
    mean = lambda b, fix: f"{b[fix].mean():.2f}" if fix.any() else " float"
    title = (f"Per-layer bit-widths ({n} layers; mean W{mean(w, w_fix)} / "
             f"A{mean(a, a_fix)})")
  fig.suptitle(title)
  return fig


def plot_policy_bits(path: str | os.PathLike, layers: Sequence[Mapping[str, Any]],
                     policy: Any, *, title: str | None = None,
                     dpi: float = 120) -> str:
  """Writes `policy_bits_figure(...)` as a PNG at `path`; returns the path."""
  return _write_png(policy_bits_figure(layers, policy, title=title, dpi=dpi),
                    path, dpi)


# -------------------------------------------------------- search progress


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
  reward = np.array([_number("reward", e["reward"]) for e in eps])
  cost = np.array([_number("cost", e["cost"]) for e in eps])
  reward[~np.isfinite(reward)] = np.nan
  warm = np.array([bool(e.get("warmup", False)) for e in eps])
  if all("best_reward" in e for e in eps):
    best = np.array([_number("best_reward", e["best_reward"]) for e in eps])
  else:
    best = np.fmax.accumulate(reward)
  has_val = any("val_top1" in e for e in eps)

  budget = dict(budget or {})
  metric, unit = budget.get("metric", "cost"), budget.get("unit", "")
  limit = budget.get("limit")
  lines = [v for v in (limit, (reference or {}).get("cost")) if v is not None]
  factor, unit_label = unit_scale(unit, list(cost) + lines)

  nrows = 3 if has_val else 2
  fig = _new_figure(8.0, 2.6 * nrows + 0.6, dpi)
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
  return _write_png(fig, path, dpi)


# ------------------------------------------------------- bit probabilities

_GRID_MAX_LAYERS = 12


def bit_probabilities_figure(history: Sequence[tuple[int, Any]], *,
                             names: Sequence[str], bits: Sequence[int],
                             role: str = "weight", title: str | None = None,
                             dpi: float = 120) -> Figure:
  """Per-layer probability of each candidate bit-width over search steps.

  Up to 12 layers: a grid of stacked-area charts, one per layer, with a
  legend per bit-width. More layers: an image of the expected bit-width
  (layers x steps) with a colourbar.

  Args:
    history: `(step, probs)` pairs, `probs` array-like `[L, K]`.
    names: the L layer names in forward order.
    bits: the K candidate bit-widths, in the column order of `probs`.
    role: "weight" or "activation" (titles and labels only).
    title: figure title.
    dpi: dots per inch of the figure.

  Returns:
    The figure. Grid form: one axes per layer. Image form: the image axes
    first, then the colourbar's axes.

  Raises:
    ValueError: on an empty history, a bad role, or a `probs` shape other
      than `[len(names), len(bits)]`.
  """
  if role not in ("weight", "activation"):
    raise ValueError(f"role is {role!r}; allowed: 'weight', 'activation'")
  if not history:
    raise ValueError("history is empty; nothing to plot")
  n, k = len(names), len(bits)
  if not n or not k:
    raise ValueError(f"names has {n} and bits {k} entries; both must be non-empty")
  hist = sorted(((int(s), np.asarray(p, dtype=float)) for s, p in history),
                key=lambda sp: sp[0])
  for step, p in hist:
    if p.shape != (n, k):
      raise ValueError(f"probs at step {step} has shape {p.shape}; expected "
                       f"[len(names), len(bits)] = ({n}, {k})")
  steps = np.array([s for s, _ in hist], dtype=float)  # [T]
  probs = np.stack([p for _, p in hist])  # [T, L, K]
  bits_arr = np.asarray(bits, dtype=float)
  if steps.size == 1:  # One record: widen it so that areas and cells show.
    steps, probs = np.array([steps[0] - 0.5, steps[0] + 0.5]), np.repeat(probs, 2, 0)
  cmap = mcolors.LinearSegmentedColormap.from_list(
      "bits", ["#fde725", "#35b779", "#31688e", "#440154"])  # Reversed viridis.
  title = title or f"{role.capitalize()} bit-width probabilities per layer"

  if n <= _GRID_MAX_LAYERS:
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    width = max(5.0, 2.9 * ncols + 1.0)
    fig = _new_figure(width, 2.1 * nrows + 1.2, dpi)
    grid = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    colours = [cmap(i / max(k - 1, 1)) for i in range(k)]
    top = max(1.0, float(probs.sum(-1).max()))
    for i, ax in enumerate(grid.flat):
      if i >= n:
        ax.remove()
        continue
      ax.stackplot(steps, probs[:, i, :].T, colors=colours,
                   labels=[f"{int(b)}-bit" for b in bits] if i == 0 else ())
      ax.set_title(f"{i} {_short(names[i], 28)}", fontsize=9)
      ax.set_ylim(0, top)
      ax.set_xlim(steps[0], steps[-1])
      if i % ncols == 0:
        ax.set_ylabel("probability")
      if i + ncols >= n:
        ax.set_xlabel("step")
        ax.tick_params(labelbottom=True)
    fig.legend(loc="outside lower center", fontsize=8, frameon=False,
               ncols=max(1, min(k, int(width / 0.9))), title=f"{role} bit-width",
               title_fontsize=8)
    fig.suptitle(title)
    return fig

  fig = _new_figure(9.0, min(max(4.5, 1.4 + 0.17 * n), 14.0), dpi)
  ax = fig.add_subplot()
  expected = probs @ bits_arr / np.maximum(probs.sum(-1), 1e-12)  # [T, L]
  mid = (steps[1:] + steps[:-1]) / 2
  x_edges = np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])
  mesh = ax.pcolormesh(x_edges, np.arange(n + 1) - 0.5, expected.T, cmap=cmap,
                       vmin=bits_arr.min(), vmax=bits_arr.max(), shading="flat")
  ax.set_ylim(n - 0.5, -0.5)  # Layer 0 on top, as in forward order.
  if n <= 60:
    ax.set_yticks(np.arange(n))
    ax.set_yticklabels([f"{i} {_short(s, 20)}" for i, s in enumerate(names)],
                       fontsize=7 if n > 30 else 8)
  else:
    ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=30, integer=True))
  ax.set_xlabel("step")
  ax.set_ylabel("layer (forward order)")
  bar = fig.colorbar(mesh, ax=ax)
  bar.set_label(f"expected {role} bits (bits)")
  bar.set_ticks(sorted(set(bits_arr.tolist())))
  fig.suptitle(title)
  return fig


def plot_bit_probabilities(path: str | os.PathLike,
                           history: Sequence[tuple[int, Any]], *,
                           names: Sequence[str], bits: Sequence[int],
                           role: str = "weight", title: str | None = None,
                           dpi: float = 120) -> str:
  """Writes `bit_probabilities_figure(...)` as a PNG at `path`; returns the path."""
  fig = bit_probabilities_figure(history, names=names, bits=bits, role=role,
                                 title=title, dpi=dpi)
  return _write_png(fig, path, dpi)


# ------------------------------------------------------------------ Pareto


def _check_points(points: Sequence[Mapping[str, Any]]) -> None:
  for i, p in enumerate(points):
    for key in ("cost", "top1"):
      if key not in p:
        raise ValueError(f"points[{i}] has no {key!r}; required: cost, top1")
      if not math.isfinite(_number(f"points[{i}].{key}", p[key])):
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
  fig = _new_figure(7.5, 5.0, dpi)
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
  return _write_png(fig, path, dpi)
