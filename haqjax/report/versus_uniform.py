"""The report's answer to "is the found policy better than uniform?".

A search job whose budget is a ratio of a uniform wXaY fine-tunes that
uniform policy with the same recipe (`haqjax.jobs.uniform`) and saves its
figures in results.json:

  uniform_reference            {name, cost, cost_ratio, test_top1, val_top1,
                                layer_costs, policy, ...}, or None
  delta_test_top1_vs_uniform   found minus uniform test top-1, in points
  delta_cost_vs_uniform        found minus uniform cost, the metric's SI unit
  uniform_points               `--uniform_results` points {label, cost, top1}

This module turns them into the report's blocks (a side-by-side table, the
difference in points and cost) and the command line's summary, from the
saved data only. Costs read in the units of `haqjax.units`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from haqjax import units
from haqjax.bitwidths import FLOAT_BITS

UNIFORM = re.compile(r"^w([1-8])a([1-8])$")
_LABELS = {"rl": "HAQ (RL)", "gumbel": "Gumbel search"}


def pct(value: float | None) -> str:
  """A top-1 in percent: "91.10%" ("n/a" for None)."""
  return units.NOT_AVAILABLE if value is None else f"{value:.2f}%"


def seeds_pct(results: dict[str, Any]) -> str:
  """A test top-1, as mean +- std over the seeds and the members when there are several.

  "91.10% +- 0.12 (3 seeds: 91.00%, 91.10%, 91.20%)"; one run: `pct`. A
  member that diverged reads "diverged" and the mean is over the others.
  """
  members = results.get("test_top1_members")
  if not members or len(members) < 2:
    return pct(results.get("test_top1"))
  std = results.get("test_top1_std")
  return (f"{pct(results.get('test_top1_mean'))}"
          + (f" ± {std:.2f}" if std is not None else "")
          + f" ({len(members)} seeds: "
          + ", ".join("diverged" if v is None else pct(v) for v in members) + ")")


def points(value: float | None) -> str:
  """A signed difference of top-1s: "+0.13 points"."""
  return units.NOT_AVAILABLE if value is None else f"{value:+.2f} points"


def bits_text(layers: Sequence[dict[str, Any]], key: str) -> str:
  """Per-layer bits as "8 4 4 f" (f: float)."""
  return " ".join("f" if l[key] == FLOAT_BITS else str(l[key]) for l in layers)


def found_label(results: dict[str, Any]) -> str:
  """How reports name a run's policy: "HAQ (RL)", "Gumbel search"."""
  return _LABELS.get(results.get("mode"), str(results.get("mode")))


def is_uniform_ratio(search: dict[str, Any]) -> bool:
  """Whether a saved search config's budget is a ratio of a uniform wXaY."""
  return (search.get("budget_kind") == "ratio"
          and bool(UNIFORM.match(str(search.get("budget_reference", "")))))


def _digits(results: dict[str, Any], ref: dict[str, Any]) -> int:
  """Significant digits that tell the found and the uniform cost apart."""
  return units.digits_apart([results["cost"], ref["cost"]], results["unit"])


def summary_row(results: dict[str, Any]) -> tuple[str, str] | None:
  """The report's one-line answer, for its summary table (None without a reference)."""
  ref = results.get("uniform_reference")
  if not ref:
    return None
  unit = results["unit"]
  ratio = results["cost"] / ref["cost"] if ref["cost"] else float("nan")
  digits = _digits(results, ref)
  return (f"uniform {ref['name']}: test top-1",
          f"{seeds_pct(ref)} at {units.format_cost(ref['cost'], unit, digits)}; the "
          f"found policy {points(results.get('delta_test_top1_vs_uniform'))} at "
          f"{ratio:.3f}x its cost")


def blocks(results: dict[str, Any], search: dict[str, Any],
           found_layers: Sequence[dict[str, Any]]) -> list[tuple]:
  """The "found policy vs uniform" section (empty when there is nothing to compare).

  Args:
    results: the run's results.json.
    search: its search_config.json.
    found_layers: its policy's layers ({name, w_bits, a_bits}).
  """
  ref = results.get("uniform_reference")
  others = results.get("uniform_points") or []
  budget_ref = search.get("budget_reference")
  # Runs from before these keys have none of them: no section, no note.
  skipped = not ref and "uniform_reference" in results and is_uniform_ratio(search)
  if not ref and not others and not skipped:
    return []
  unit = results["unit"]
  name = ref["name"] if ref else budget_ref if skipped else ""
  out: list[tuple] = [("h", 2, f"Found policy vs uniform {name}".rstrip())]
  if skipped:
    out.append(("p", f"Uniform {budget_ref}, the budget's reference, was not fine-tuned "
                     "(--nofinetune_uniform_reference); rerun the command without it to "
                     "compare."))
  if ref:
    digits = _digits(results, ref)
    label, cells = units.format_costs([results["cost"], ref["cost"]], unit, digits)
    delta_cost = results["cost"] - ref["cost"]
    factor, _ = units.scale(unit, [results["cost"], ref["cost"]])
    delta_val = (None if results.get("val_top1") is None or ref.get("val_top1") is None
                 else results["val_top1"] - ref["val_top1"])
    ratio = results["cost"] / ref["cost"] if ref["cost"] else float("nan")
    out.append(("table", ("policy", "weight bits", "activation bits", f"cost ({label})",
                          f"cost (x {budget_ref})", "test top-1", "val top-1"),
                [(found_label(results), bits_text(found_layers, "w_bits"),
                  bits_text(found_layers, "a_bits"), cells[0],
                  f"{results['cost_ratio']:.3f}", seeds_pct(results),
                  pct(results.get("val_top1"))),
                 (f"uniform {ref['name']}", bits_text(ref["policy"], "w_bits"),
                  bits_text(ref["policy"], "a_bits"), cells[1], f"{ref['cost_ratio']:.3f}",
                  seeds_pct(ref), pct(ref.get("val_top1"))),
                 ("found - uniform", "", "",
                  ("+" if delta_cost >= 0 else "") + units.format_number(delta_cost * factor),
                  f"{results['cost_ratio'] - ref['cost_ratio']:+.3f}",
                  points(results.get("delta_test_top1_vs_uniform")), points(delta_val))]))
    delta = results.get("delta_test_top1_vs_uniform")
    verdict = ("better than" if delta > 0 else "worse than" if delta < 0
               else "as good as") if delta is not None else "compared with"
    out.append(("p", f"The found policy is {verdict} uniform {ref['name']} on the test "
                     f"split ({points(delta)}) at {ratio:.3f}x its cost "
                     f"({units.format_cost(results['cost'], unit, digits)} against "
                     f"{units.format_cost(ref['cost'], unit, digits)}, "
                     f"{units.format_delta(delta_cost, unit)}). Both were fine-tuned with "
                     "the same recipe from the same FP32 weights; the uniform one in "
                     f"{ref.get('directory', 'uniform_reference')}/."
                     + (f" Test top-1s are means over {len(results['seeds'])} seeds "
                        "(± sample standard deviation), the difference of the means."
                        if results.get("seeds") else "")))
  if others:
    label, cells = units.format_costs([p["cost"] for p in others], unit)
    out.append(("table", ("uniform (--uniform_results)", f"cost ({label})", "test top-1",
                          "found - it"),
                [(p["label"], c, pct(p["top1"]),
                  points(None if results.get("test_top1") is None
                         else results["test_top1"] - p["top1"]))
                 for p, c in zip(others, cells)]))
  return out


def summary_lines(results: dict[str, Any]) -> list[str]:
  """What a search job prints last: its policy and the uniform one, readable costs."""
  unit, ref_name = results["unit"], results.get("budget_reference")
  of = f" x {ref_name}" if ref_name else ""
  ref = results.get("uniform_reference")
  digits = _digits(results, ref) if ref else 3
  cost = lambda value: units.format_cost(value, unit, digits)
  lines = [f"{found_label(results)}: {cost(results['cost'])} "
           f"({results['cost_ratio']:.3f}{of}), test top-1 {seeds_pct(results)}"]
  if ref:
    lines.append(f"uniform {ref['name']}: {cost(ref['cost'])} ({ref['cost_ratio']:.3f}{of}), "
                 f"test top-1 {seeds_pct(ref)}; found - uniform: "
                 f"{points(results.get('delta_test_top1_vs_uniform'))}")
  return lines
