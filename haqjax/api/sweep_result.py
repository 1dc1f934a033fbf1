"""What `haqjax.sweep` returns: per member its policy, cost, budget and accuracies.

`SweepResult.report()` is a markdown page: the FP32 model, one row per
member (its swept values, budget, cost in readable units and as a ratio of
its budget's reference, whether it fits, top-1 in the search and after the
fine-tune, bits), then the uniform points. `write(directory)` writes it as
`report.md` beside `results.json`, each member's `policies/mNN.json`
(`haqjax.policy/1`, with its cost and budget) and `plots/pareto.png` (top-1
against cost, members and uniform points). In a notebook the result
displays as its report.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from haqjax import io as haq_io
from haqjax import units
from haqjax.policy import Policy
from haqjax.policy import save_policy
from haqjax.report.render import markdown_table
from haqjax.typing import PyTree


def _pct(value: float | None) -> str:
  return units.NOT_AVAILABLE if value is None else f"{value:.2f}%"


@dataclasses.dataclass(frozen=True, eq=False)
class SweepResult:
  """K searched policies on the user's model, with their costs and accuracies.

  Attributes:
    policies: per member, its per-layer bits (layer-table order), within its
      budget.
    members: per member (sweep order): `member`, `label`, `values` (the
      swept values besides the budget), `budget` (as text), `reference`,
      `limit`, `cost` (in `unit`), `cost_ratio` (over the reference's),
      `fits`, `search_val_top1`, `argmax_cost_ratio`, `enforced`, `w_bits`,
      `a_bits`, and the fine-tuned policy's fake-quant `val_top1` (and
      `test_top1`), percent.
    table: the model's layer table (`haqjax.nn.LayerTable`).
    model: the model taking `policy=` (the user's, wrapped if it was plain).
    variables: per member, its policy's fine-tuned variables.
    target: the hardware target.
    metric: the budgets' metric; unit: its SI unit (s, J, bytes, ...).
    fp32: the FP32 model's `val_top1` (and `test_top1`), percent.
    uniform: per uniform point: label, bits, cost, val_top1 (test_top1).
    search: the stacked search's `steps`, per-member epoch `records` and
      `trace_counts` (one trace of the train step serves all members).
    timings: seconds per stage.
  """
  policies: list[Policy]
  members: list[dict[str, Any]]
  table: Any
  model: Any
  variables: list[PyTree]
  target: str
  metric: str
  unit: str
  fp32: dict[str, float]
  uniform: list[dict[str, Any]]
  search: dict[str, Any]
  timings: dict[str, float]

  @property
  def costs(self) -> list[float]:
    """Per member, its policy's cost in `unit`."""
    return [m["cost"] for m in self.members]

  @property
  def val_top1(self) -> list[float]:
    """Per member, its fine-tuned policy's fake-quant top-1 on the held-out data."""
    return [m["val_top1"] for m in self.members]

  @property
  def test_top1(self) -> list[float] | None:
    """Per member, its test top-1; None without test data."""
    if "test_top1" not in self.fp32:
      return None
    return [m["test_top1"] for m in self.members]

  def cost_text(self, value: float) -> str:
    """A cost in readable units: '73.4 µs'."""
    return units.format_cost(value, self.unit)

  def summary(self) -> str:
    """One line per member: values, cost against its budget, top-1."""
    which = "test" if "test_top1" in self.fp32 else "val"
    return "\n".join(
        f"{m['label']}: {self.metric} {self.cost_text(m['cost'])} "
        f"({m['cost_ratio']:.3f} x {m['reference']}, {'fits' if m['fits'] else 'OVER'}); "
        f"{which} top-1 {m[f'{which}_top1']:.2f}% (FP32 {self.fp32[f'{which}_top1']:.2f}%)"
        for m in self.members)

  def report(self) -> str:
    """The markdown report (see the module docstring)."""
    has_test = "test_top1" in self.fp32
    head = ["member", "values", "budget", f"{self.metric}", "x reference", "fits",
            "search val top-1", "val top-1"] + (["test top-1"] if has_test else [])
    head += ["W bits", "A bits"]
    body = []
    for m in self.members:
      row = [m["member"], m["label"], m["budget"], self.cost_text(m["cost"]),
             f"{m['cost_ratio']:.3f} x {m['reference']}", "yes" if m["fits"] else "OVER",
             _pct(m["search_val_top1"]), _pct(m["val_top1"])]
      row += [_pct(m["test_top1"])] if has_test else []
      body.append(row + ["-".join(map(str, m["w_bits"])), "-".join(map(str, m["a_bits"]))])
    fp32 = f"val {_pct(self.fp32['val_top1'])}" + (
        f", test {_pct(self.fp32['test_top1'])}" if has_test else "")
    lines = [f"# Gumbel sweep on {self.target}: {len(self.members)} members", "",
             f"FP32: {fp32}.", "", markdown_table(head, body)]
    if self.uniform:
      uhead = ["uniform", f"{self.metric}", "val top-1"] + (["test top-1"] if has_test else [])
      lines += ["", markdown_table(uhead, [
          [u["label"].upper(), self.cost_text(u["cost"]), _pct(u.get("val_top1"))]
          + ([_pct(u.get("test_top1"))] if has_test else []) for u in self.uniform])]
    seconds = ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s"
                        for k, v in self.timings.items())
    return "\n".join(lines + ["", f"Time: {seconds}.", ""])

  def _repr_markdown_(self) -> str:
    return self.report()

  def to_dict(self) -> dict[str, Any]:
    """Everything but the model and variables, JSON-ready."""
    return {"target": self.target, "metric": self.metric, "unit": self.unit,
            "members": self.members, "fp32": self.fp32, "uniform": self.uniform,
            "search": {k: v for k, v in self.search.items() if k != "records"},
            "timings": self.timings}

  def write(self, directory: str | os.PathLike) -> str:
    """Writes report.md, results.json, policies/ and plots/pareto.png; returns report.md's path."""
    from haqjax import report  # pylint: disable=g-import-not-at-top
    directory = os.fspath(directory)
    for sub in ("plots", "policies"):
      os.makedirs(os.path.join(directory, sub), exist_ok=True)
    for m, policy in zip(self.members, self.policies):
      save_policy(os.path.join(directory, "policies", f"m{m['member']:02d}.json"), policy,
                  target=self.target,
                  budget={"metric": self.metric, "text": m["budget"], "limit": m["limit"],
                          "unit": self.unit}, cost=m["cost"], cost_ratio=m["cost_ratio"])
    haq_io.write_json(os.path.join(directory, "results.json"), self.to_dict())
    which = "test_top1" if "test_top1" in self.fp32 else "val_top1"
    points = [{"label": m["label"], "group": "sweep", "cost": m["cost"], "top1": m[which]}
              for m in self.members]
    points += [{"label": u["label"], "group": "uniform", "cost": u["cost"],
                "top1": u[which]} for u in sorted(self.uniform, key=lambda u: u["cost"])]
    report.plot_pareto(os.path.join(directory, "plots", "pareto.png"), points,
                       metric=self.metric, unit=self.unit,
                       title=f"{len(self.members)}-member Gumbel sweep on {self.target}")
    path = os.path.join(directory, "report.md")
    with open(path, "w") as f:
      f.write(self.report() + "\n![Pareto](plots/pareto.png)\n")
    return path
