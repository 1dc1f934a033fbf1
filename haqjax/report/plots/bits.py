"""Per-layer bit-width figures: a policy's bits and the search's bit probabilities.

`policy_bits_figure` draws weights above and activations below the axis, as
HAQ's Figures 3 and 5 do; `bit_probabilities_figure` shows how a Gumbel
search's per-layer distribution over candidate bit-widths moves over steps.

    plot_policy_bits("policy.png", json.load(open("layers.json")),
                     json.load(open("policy.json")))

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
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from haqjax.bitwidths import FLOAT_BITS
from haqjax.report.plots.canvas import new_figure
from haqjax.report.plots.canvas import short_name
from haqjax.report.plots.canvas import write_png

# The layer kinds of `haqjax.nn.table.KINDS`; a 'matmul' multiplies two
# activations, its second operand's bits drawn where a kernel's are.
KINDS = ("conv", "depthwise", "dense", "matmul")

# Colour and hatch per layer kind (colour-blind-safe "tab" hues).
_KIND_STYLE = {
    "conv": dict(color="#1f77b4", label="conv (full / pointwise)"),
    "depthwise": dict(color="#ff7f0e", label="depthwise conv"),
    "dense": dict(color="#2ca02c", label="dense"),
    "matmul": dict(color="#9467bd", label="matmul of activations (2nd operand up)"),
}
# Bit probabilities of up to this many layers are a grid of charts; more, an image.
_GRID_MAX_LAYERS = 12


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
                       title: str | None = None,
                       reference: Mapping[str, Any] | None = None,
                       dpi: float = 120) -> Figure:
  """Per-layer weight (up) and activation (down) bit-widths, HAQ Fig. 3/5 style.

  Args:
    layers: rows of `layers.json` in forward order ("name", "kind", ...).
    policy: the policy's dict form or a `haqjax.policy.Policy`.
    title: figure title (`fig.get_suptitle()`); the default names the layer
      count and the unweighted mean of the quantized bit-widths.
    reference: a uniform policy to compare with, {"label", "w_bits",
      "a_bits"}: dashed lines at +w_bits and -a_bits.
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
  fig = new_figure(width, 5.0 + (1.4 if show_names else 0.0), dpi)
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

  ref_bits = [] if reference is None else [int(reference["w_bits"]),
                                             int(reference["a_bits"])]
  if reference is not None:
    for y in (ref_bits[0], -ref_bits[1]):
      ax.axhline(y, color="black", linestyle="--", linewidth=1.1, zorder=4)
  finite = np.concatenate([w[w_fix], a[a_fix], [1], ref_bits])
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
      ax.set_xticklabels([f"{i} {short_name(s)}" for i, s in enumerate(names)],
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
  if reference is not None:
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.1,
                          label=f"{reference.get('label', 'uniform')}: "
                                f"W{ref_bits[0]} / A{ref_bits[1]}"))
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
                     reference: Mapping[str, Any] | None = None,
                     dpi: float = 120) -> str:
  """Writes `policy_bits_figure(...)` as a PNG at `path`; returns the path."""
  fig = policy_bits_figure(layers, policy, title=title, reference=reference, dpi=dpi)
  return write_png(fig, path, dpi)


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
    fig = new_figure(width, 2.1 * nrows + 1.2, dpi)
    grid = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    colours = [cmap(i / max(k - 1, 1)) for i in range(k)]
    top = max(1.0, float(probs.sum(-1).max()))
    for i, ax in enumerate(grid.flat):
      if i >= n:
        ax.remove()
        continue
      ax.stackplot(steps, probs[:, i, :].T, colors=colours,
                   labels=[f"{int(b)}-bit" for b in bits] if i == 0 else ())
      ax.set_title(f"{i} {short_name(names[i], 28)}", fontsize=9)
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

  fig = new_figure(9.0, min(max(4.5, 1.4 + 0.17 * n), 14.0), dpi)
  ax = fig.add_subplot()
  expected = probs @ bits_arr / np.maximum(probs.sum(-1), 1e-12)  # [T, L]
  mid = (steps[1:] + steps[:-1]) / 2
  x_edges = np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])
  mesh = ax.pcolormesh(x_edges, np.arange(n + 1) - 0.5, expected.T, cmap=cmap,
                       vmin=bits_arr.min(), vmax=bits_arr.max(), shading="flat")
  ax.set_ylim(n - 0.5, -0.5)  # Layer 0 on top, as in forward order.
  if n <= 60:
    ax.set_yticks(np.arange(n))
    ax.set_yticklabels([f"{i} {short_name(s, 20)}" for i, s in enumerate(names)],
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
  return write_png(fig, path, dpi)
