"""Search families against uniform at the same cost, over seeds: statistics and tables.

Each row of a comparison is one family's result under one budget (target,
metric, uniform reference): the test top-1 of its K fine-tunes, member k
fine-tuned with seed k (and, for families that search, found by the search
with seed k), and the uniform policy of the budget fine-tuned over the same
K seeds. The difference to uniform is paired by seed,

  d_k = top1_k(family) - top1_k(uniform),

which removes what the seeds share (data order, initial noise) from the
comparison; its mean comes with a Student-t confidence interval,

  mean(d) +- t_{(1 + confidence) / 2, K - 1} * std(d, ddof=1) / sqrt(K).

A member whose fine-tune diverged has no figure (None): the row's mean and
std are over its other members, its `diverged` column counts it, and the
pairs it belongs to (its own, or the reference's member of its seed)
leave the difference, which is over the remaining pairs.

`table` turns rows into these figures, `write_csv` and `write_markdown` the
files (each written to a temporary file, then renamed) and `plot_target`
one figure per target: mean +- std per budget and family.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from haqjax import io as haq_io
from haqjax.report.plots.canvas import new_figure
from haqjax.report.plots.canvas import write_png

UNIFORM = "uniform"
# (key, header) of the table's columns, in order.
COLUMNS = (
    ("target", "target"), ("metric", "metric"), ("budget", "budget"),
    ("family", "family"), ("cost_ratio", "cost / budget"), ("top1_mean", "top-1 mean"),
    ("top1_std", "std"), ("members", "members"), ("diverged", "diverged"),
    ("diff_mean", "diff mean"),
    ("ci_low", "CI low"), ("ci_high", "CI high"), ("search_seconds", "search s"),
)
_STYLE = {"uniform": ("o", "black"), "uniform_max": ("o", "#7f7f7f"), "rl": ("D", "#d62728"), "rl_executed": ("d", "#9467bd"),
          "rl_saving": ("P", "#8c564b"), "gumbel": ("^", "#1f77b4"),
          "hawq": ("s", "#2ca02c"), "greedy": ("v", "#ff7f0e")}


def paired_difference(values: Sequence[float], reference: Sequence[float],
                      confidence: float = 0.95) -> dict[str, Any]:
  """The mean of `values[k] - reference[k]` and its Student-t confidence interval.

  Args:
    values: a family's figures, one per seed.
    reference: the uniform policy's, in the same seed order.
    confidence: the interval's coverage, in (0, 1).

  Returns:
    `mean`, `std` (sample, ddof=1), `low`, `high` and `n`; with one pair
    `std`, `low` and `high` are None (no interval from one difference).

  Raises:
    ValueError: for no pairs, lengths that differ or a confidence outside (0, 1).
  """
  if len(values) != len(reference) or not values:
    raise ValueError(f"values has {len(values)} figures and reference {len(reference)}; "
                     "allowed: the same number, at least one")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence is {confidence!r}; allowed: a number in (0, 1)")
  d = np.asarray(values, float) - np.asarray(reference, float)
  n, mean = len(d), float(np.mean(d))
  if n == 1:
    return {"mean": mean, "std": None, "low": None, "high": None, "n": 1}
  std = float(np.std(d, ddof=1))
  half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
  return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n}


def _key(row: Mapping[str, Any]) -> tuple[str, str, str]:
  return row["target"], row["metric"], row["budget"]


def table(rows: Sequence[Mapping[str, Any]], confidence: float = 0.95,
          reference: str = UNIFORM) -> list[dict[str, Any]]:
  """The comparison's table: `COLUMNS`' figures per row, in `rows`' order.

  Args:
    rows: dicts with `target`, `metric`, `budget`, `family`, `cost_ratio`,
      `members` (test top-1 per seed, seed order; None for a member that
      diverged) and `search_seconds`;
      every (target, metric, budget) needs its `family == "uniform"` row.
    confidence: of the paired difference's interval.
    reference: the family every other row is paired with: uniform, or
      another (e.g. `uniform_max`, the widest uniform policy within the
      budget) where the budget has its row, uniform where not.

  Returns:
    One dict per row: its keys, `top1_mean`, `top1_std` (ddof=1, over the
    members that did not diverge; None for one), `diverged` (how many did;
    `top1_mean` is None when all did) and, except for the reference's rows and rows of the same
    policies (`policies`, when the rows have them), `diff_mean`, `ci_low` and
    `ci_high` of `paired_difference` against the same budget's reference.

  Raises:
    ValueError: for a budget without a uniform row, or members of another count.
  """
  uniform = {_key(r): r for r in rows if r["family"] == UNIFORM}
  chosen = {_key(r): r for r in rows if r["family"] == reference}
  out = []
  for row in rows:
    if _key(row) not in uniform:
      raise ValueError(f"{'/'.join(_key(row))} has no uniform row; allowed: rows with a "
                       "uniform row of the same target, metric and budget")
    ref = chosen.get(_key(row), uniform[_key(row)])
    members = [None if v is None else float(v) for v in row["members"]]
    ran = [v for v in members if v is not None]
    line = {k: row.get(k) for k, _ in COLUMNS}
    line["members"] = members
    line["diverged"] = len(members) - len(ran)
    line["top1_mean"] = float(np.mean(ran)) if ran else None
    line["top1_std"] = float(np.std(ran, ddof=1)) if len(ran) > 1 else None
    line["policies"] = row.get("policies")
    line.update(diff_mean=None, ci_low=None, ci_high=None)
    # A row of the reference's own policies (uniform_max where it is the
    # budget's uniform, a search that found it) has nothing to pair.
    same = row is ref or (row.get("policies") is not None
                          and row.get("policies") == ref.get("policies"))
    if len(ref["members"]) != len(members):
      raise ValueError(f"{'/'.join(_key(row))}: {row['family']} has {len(members)} members "
                       f"and {ref['family']} {len(ref['members'])}; allowed: the same number")
    pairs = [(v, r) for v, r in zip(members, ref["members"])
             if v is not None and r is not None]
    if not same and pairs:
      diff = paired_difference(*zip(*pairs), confidence=confidence)
      line.update(diff_mean=diff["mean"], ci_low=diff["low"], ci_high=diff["high"])
    out.append(line)
  return out


def _cell(key: str, value: Any) -> str:
  if value is None:
    return ""
  if key == "members":
    return " ".join("diverged" if v is None else f"{v:.2f}" for v in value)
  if key == "cost_ratio":
    return f"{value:.3f}"
  if key == "search_seconds":
    return f"{value:.1f}"
  if key in ("diff_mean", "ci_low", "ci_high"):
    return f"{value:+.2f}"
  if isinstance(value, float):
    return f"{value:.2f}"
  return str(value)


def write_csv(path: str, lines: Sequence[Mapping[str, Any]]) -> str:
  """`table`'s lines as CSV (full precision; members space-separated, a
  diverged one as `nan`)."""
  with haq_io.atomic_open(path) as f:
    writer = csv.writer(f)
    writer.writerow([k for k, _ in COLUMNS])
    for line in lines:
      writer.writerow(["" if line.get(k) is None else
                       " ".join("nan" if v is None else repr(v) for v in line[k])
                       if k == "members" else line[k]
                       for k, _ in COLUMNS])
  return path


def markdown(lines: Sequence[Mapping[str, Any]], title: str = "") -> str:
  """`table`'s lines as a markdown table (top-1s in points, 2 decimals)."""
  out = [f"# {title}", ""] if title else []
  out.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
  out.append("|" + "|".join("---" for _ in COLUMNS) + "|")
  out += ["| " + " | ".join(_cell(k, line.get(k)) for k, _ in COLUMNS) + " |"
          for line in lines]
  return "\n".join(out) + "\n"


def _uniform_label(line: Mapping[str, Any]) -> str:
  """'W8A4 ' for a row whose every policy is one uniform wXaY other than its budget's."""
  policies = line.get("policies") or []
  bits = {(tuple(p["w_bits"]), tuple(p["a_bits"])) for p in policies}
  if len(bits) != 1:
    return ""
  w, a = next(iter(bits))
  # The first and last layers may be fixed by convention (8-bit weights, 8- or
  # 32-bit inputs): the middle ones say, if the ends hold theirs or a fixed one.
  inner_w, inner_a = set(w[1:-1] or w), set(a[1:-1] or a)
  if len(inner_w) != 1 or len(inner_a) != 1:
    return ""
  ends_w, ends_a = {w[0], w[-1]} - inner_w, {a[0], a[-1]} - inner_a
  if not ends_w <= {8} or not ends_a <= {8, 32}:
    return ""
  label = f"W{inner_w.pop()}A{inner_a.pop()}"
  return "" if label.lower() == line["budget"] else label + " "


def summary(lines: Sequence[Mapping[str, Any]], title: str = "") -> str:
  """`table`'s lines as one markdown row per target, metric and budget.

  A column per family holds its top-1 "mean +- std" and, but for the
  reference's (`table`'s), the paired difference to the reference with its
  interval, "(+d [low, high])"; bold where the interval lies above zero,
  italic where below. A row whose policies are one uniform policy of other
  bits than its budget's (`uniform_max`'s, a search's) is named by them; one
  with diverged members says how many ("81.20 ± 0.40, 1 of 3 diverged"), or
  "diverged (3 of 3)" when none is left.
  """
  families = list(dict.fromkeys(l["family"] for l in lines))
  by = {(*_key(l), l["family"]): l for l in lines}
  out = [f"# {title}", ""] if title else []
  out.append("| target | metric | budget | " + " | ".join(families) + " |")
  out.append("|---|---|---|" + "---|" * len(families))
  for key in dict.fromkeys(_key(l) for l in lines):
    cells = []
    for family in families:
      line = by.get((*key, family))
      if line is None:
        cells.append("")
        continue
      std, lost, k = line["top1_std"], line.get("diverged") or 0, len(line["members"])
      if line["top1_mean"] is None:
        cells.append(_uniform_label(line) + f"diverged ({lost} of {k})")
        continue
      text = (_uniform_label(line) + f"{line['top1_mean']:.2f}"
              + (f" ± {std:.2f}" if std is not None else "")
              + (f", {lost} of {k} diverged" if lost else ""))
      if line["diff_mean"] is not None:
        interval = ("" if line["ci_low"] is None else
                    f" [{line['ci_low']:+.2f}, {line['ci_high']:+.2f}]")
        text += f" ({line['diff_mean']:+.2f}{interval})"
        if line["ci_low"] is not None and line["ci_low"] > 0:
          text = f"**{text}**"
        elif line["ci_high"] is not None and line["ci_high"] < 0:
          text = f"_{text}_"
      cells.append(text)
    out.append("| " + " | ".join([*key, *cells]) + " |")
  return "\n".join(out) + "\n"


def write_markdown(path: str, lines: Sequence[Mapping[str, Any]], title: str = "",
                   summaries: Sequence[str] = ()) -> str:
  """`markdown(lines, title)`, then `summaries` (e.g. `summary`'s), written to `path`."""
  with haq_io.atomic_open(path) as f:
    f.write("\n".join([markdown(lines, title), *summaries]))
  return path


def plot_target(path: str, lines: Sequence[Mapping[str, Any]], target: str,
                title: str | None = None, dpi: float = 120) -> str:
  """Test top-1, mean +- std, per budget and family; one panel per metric.

  Args:
    path: the PNG's path.
    lines: `table`'s lines (those of other targets are ignored).
    target: the target drawn.
    title: the figure's title (default: the target's name).
    dpi: resolution.

  Returns:
    `path`.
  """
  lines = [l for l in lines if l["target"] == target]
  if not lines:
    raise ValueError(f"target is {target!r}; allowed: a target of the lines "
                     "(none has it)")
  metrics = list(dict.fromkeys(l["metric"] for l in lines))
  families = list(dict.fromkeys(l["family"] for l in lines))
  fig = new_figure(max(4.0 * len(metrics) + 1.0, 7.0), 3.6, dpi)
  axes = fig.subplots(1, len(metrics), squeeze=False)[0]
  width = 0.8 / max(len(families), 1)
  for ax, metric in zip(axes, metrics):
    budgets = list(dict.fromkeys(l["budget"] for l in lines if l["metric"] == metric))
    for j, family in enumerate(families):
      marker, colour = _STYLE.get(family, ("P", "#7f7f7f"))
      xs, ys, errs = [], [], []
      for i, budget in enumerate(budgets):
        line = next((l for l in lines if (l["metric"], l["budget"], l["family"])
                     == (metric, budget, family)), None)
        if line is not None and line["top1_mean"] is not None:
          xs.append(i - 0.4 + width * (j + 0.5))
          ys.append(line["top1_mean"])
          errs.append(line["top1_std"] or 0.0)
      ax.errorbar(xs, ys, yerr=errs, fmt=marker, color=colour, capsize=3, label=family)
    ax.set_xticks(range(len(budgets)), [b.upper() for b in budgets])
    ax.set_xlabel(f"budget: {metric} of uniform")
    ax.set_ylabel("test top-1 (%), mean ± std")
    ax.grid(True, axis="y", alpha=0.3)
  axes[-1].legend(fontsize="small")
  fig.suptitle(title or target, fontsize="medium")
  return write_png(fig, path, dpi)


__all__ = ["COLUMNS", "markdown", "paired_difference", "plot_target", "table",
           "write_csv", "write_markdown"]
