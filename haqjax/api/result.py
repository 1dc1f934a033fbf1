"""What `haqjax.search_policy` returns: the policy, its costs, accuracies and report.

`SearchResult.report()` is a markdown page (budget, accuracy and cost of
the FP32 model, the found policy and each uniform point, then every layer's
bits and cost on the target, in readable units: `haqjax.units`);
`write(directory)` writes it as `report.md` beside `policy.json`
(`haqjax.policy/1`, with the cost and budget), `results.json` and
`plots/bits.png`. In a notebook the result displays as its report.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from haqjax import io as haq_io
from haqjax import units
from haqjax.bitwidths import FLOAT_BITS
from haqjax.policy import Policy
from haqjax.policy import save_policy
from haqjax.report.render import markdown_table
from haqjax.typing import PyTree


def _pct(value: float | None) -> str:
  return units.NOT_AVAILABLE if value is None else f"{value:.2f}%"


def _bits(b: int) -> str:
  return "float" if int(b) == FLOAT_BITS else str(int(b))


@dataclasses.dataclass(frozen=True, eq=False)
class SearchResult:
  """A searched policy on the user's model, with its costs and accuracies.

  Attributes:
    policy: the per-layer bits (layer-table order), within the budget.
    table: the model's layer table (`haqjax.nn.LayerTable`).
    model: the model taking `policy=` (the user's, wrapped if it was plain).
    variables: the policy's fine-tuned variables (quantizers calibrated).
    method: 'gumbel', 'rl' or 'hawq'.
    target: the hardware target.
    budget: the budget, as text ('latency <= 1 x w4a4').
    metric: its metric; unit: the metric's SI unit (s, J, bytes, ...).
    limit: the budget's limit in `unit`.
    reference: the network a ratio budget refers to ('w8a8', 'w4a4', ...).
    cost: the policy's cost in `unit`; cost_ratio: over the reference's.
    layer_costs: `[L]` per-layer costs summing to `cost`.
    fits: whether `cost` is within the limit.
    fp32: the FP32 model's `val_top1` (and `test_top1`), percent.
    quantized: the fine-tuned policy's fake-quant `val_top1` (`test_top1`).
    integer: the integer model's `top1` on the test (else held-out) data and
      its `agreement` with the fake-quant predictions, percent; `top1` None
      with a `reason` where `haqjax.deploy` cannot lower the model.
    uniform: per uniform point: label, bits, cost, val_top1 (test_top1).
    search: the search's own figures and per-episode/epoch records.
    timings: seconds per stage.
  """
  policy: Policy
  table: Any
  model: Any
  variables: PyTree
  method: str
  target: str
  budget: str
  metric: str
  unit: str
  limit: float
  reference: str
  cost: float
  cost_ratio: float
  layer_costs: np.ndarray
  fits: bool
  fp32: dict[str, float]
  quantized: dict[str, float]
  integer: dict[str, Any]
  uniform: list[dict[str, Any]]
  search: dict[str, Any]
  timings: dict[str, float]

  @property
  def test_top1(self) -> float | None:
    """The fine-tuned policy's fake-quant test top-1 (percent), if test data was given."""
    return self.quantized.get("test_top1")

  @property
  def val_top1(self) -> float:
    """Its fake-quant top-1 on the held-out data (percent)."""
    return self.quantized["val_top1"]

  def cost_text(self, value: float | None = None) -> str:
    """A cost in readable units (the policy's by default): '73.4 µs'."""
    return units.format_cost(self.cost if value is None else value, self.unit)

  def summary(self) -> str:
    """One line: method, cost against the budget, top-1."""
    which = "test" if self.test_top1 is not None else "val"
    top1 = self.quantized[f"{which}_top1"]
    return (f"{self.method} on {self.target}: {self.metric} {self.cost_text()} "
            f"({self.cost_ratio:.3f} x {self.reference}; limit "
            f"{self.cost_text(self.limit)}, {'fits' if self.fits else 'OVER'}); "
            f"{which} top-1 {top1:.2f}% (FP32 {self.fp32[f'{which}_top1']:.2f}%)")

  def rows(self) -> list[dict[str, Any]]:
    """Per layer: name, kind, MACs, bits and cost (JSON-ready)."""
    w, a = np.asarray(self.policy.w_bits), np.asarray(self.policy.a_bits)
    return [{"name": n, "kind": k, "macs": int(m), "w_bits": int(w[i]),
             "a_bits": int(a[i]), "cost": float(self.layer_costs[i])}
            for i, (n, k, m) in enumerate(zip(self.table.names, self.table.kinds,
                                              self.table.macs))]

  def report(self) -> str:
    """The markdown report (see the module docstring)."""
    has_test = "test_top1" in self.fp32
    head = ["", f"{self.metric}", f"x {self.reference}", "val top-1"]
    head += ["test top-1"] if has_test else []
    ref = self.cost / self.cost_ratio if self.cost_ratio else float("nan")
    points = [("FP32", None, self.fp32)]
    points += [(f"found ({self.method})", self.cost, self.quantized)]
    points += [(f"uniform {u['label'].upper()}", u["cost"], u) for u in self.uniform]
    body = []
    for label, cost, scores in points:
      row = [label, units.NOT_AVAILABLE if cost is None else self.cost_text(cost),
             units.NOT_AVAILABLE if cost is None else f"{cost / ref:.3f}",
             _pct(scores.get("val_top1"))]
      body.append(row + ([_pct(scores.get("test_top1"))] if has_test else []))
    integer = self.integer.get("top1")
    lines = [
        f"# Mixed-precision policy: {self.method} search on {self.target}", "",
        f"Budget: {self.budget} = {self.cost_text(self.limit)}; the found policy costs "
        f"{self.cost_text()} ({'within' if self.fits else 'OVER'} the budget).", "",
        markdown_table(head, body), "",
        "Integer model (`haqjax.deploy`): " + (
            _pct(integer) + " top-1" if integer is not None
            else f"not built ({self.integer.get('reason', 'unknown')})."), "",
        "## Per-layer bits and cost", "",
        markdown_table(("#", "layer", "kind", "MACs", "W", "A", f"{self.metric}"),
                       [(i, r["name"], r["kind"], f"{r['macs']:,}", _bits(r["w_bits"]),
                         _bits(r["a_bits"]), self.cost_text(r["cost"]))
                        for i, r in enumerate(self.rows())])]
    if self.table.float_ops:
      lines += ["", "Left in floating point (not quantized): " + ", ".join(
          f"`{op.name}` ({op.primitive})" for op in self.table.float_ops) + "."]
    seconds = ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s"
                        for k, v in self.timings.items())
    return "\n".join(lines + ["", f"Time: {seconds}.", ""])

  def _repr_markdown_(self) -> str:
    return self.report()

  def to_dict(self) -> dict[str, Any]:
    """Everything but the model and variables, JSON-ready."""
    search = {k: v for k, v in self.search.items() if k != "records"}
    return {"method": self.method, "target": self.target, "budget": self.budget,
            "metric": self.metric, "unit": self.unit, "limit": self.limit,
            "reference": self.reference, "cost": self.cost, "cost_ratio": self.cost_ratio,
            "fits": self.fits, "layers": self.rows(), "fp32": self.fp32,
            "quantized": self.quantized, "integer": self.integer, "uniform": self.uniform,
            "search": search, "timings": self.timings}

  def write(self, directory: str | os.PathLike) -> str:
    """Writes report.md, policy.json, results.json and plots/bits.png; returns report.md's path."""
    from haqjax import report  # pylint: disable=g-import-not-at-top
    directory = os.fspath(directory)
    os.makedirs(os.path.join(directory, "plots"), exist_ok=True)
    save_policy(os.path.join(directory, "policy.json"), self.policy, target=self.target,
                budget={"metric": self.metric, "text": self.budget, "limit": self.limit,
                        "unit": self.unit}, cost=self.cost, cost_ratio=self.cost_ratio)
    haq_io.write_json(os.path.join(directory, "results.json"), self.to_dict())
    report.plot_policy_bits(os.path.join(directory, "plots", "bits.png"),
                            self.table.rows(), self.policy.to_dict(),
                            title=f"{self.method} policy, {self.budget}")
    path = os.path.join(directory, "report.md")
    with open(path, "w") as f:
      f.write(self.report() + "\n![per-layer bits](plots/bits.png)\n")
    return path
