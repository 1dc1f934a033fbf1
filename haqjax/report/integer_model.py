"""The report's integer model: the test top-1 the deployed model gets.

A job that ends with a quantized model exports it as an integer model
(`haqjax.jobs.export`) and saves in results.json:

  test_top1              the integer model's test top-1, or the fake-quant
                         one when there is no integer model
  test_top1_fake_quant   the fake-quantized model's
  test_top1_onnxruntime  onnxruntime's on `export/model.onnx`, or None
  test_top1_source       'integer' or 'fake_quant'
  integer_error          why there is no integer model (the engine's error
                         line naming the layer, or the export's failure)
  export                 the folder written, relative to the workdir, or None

and `export/results.json` lists the files and the packed weights' size.
This module turns them into the report's lines, rows and section, from the
saved data only. Runs from before the export stage have `test_top1` alone
(fake-quant) and read as before.
"""

from __future__ import annotations

import json
import os
from typing import Any

from haqjax import units
from haqjax.report.versus_uniform import pct
from haqjax.report.versus_uniform import seeds_pct


def final_top1(results: dict[str, Any]) -> str:
  """The final test top-1 and what it is of: the integer model, or fake-quant and why."""
  r = results
  top1, source = pct(r.get("test_top1")), r.get("test_top1_source")
  if len(r.get("test_top1_members") or ()) > 1:  # K seeds: one member was exported.
    exported = ("" if r.get("export_test_top1_source") != "integer" else
                f"; member {r.get('export_member', 0)}'s integer model "
                f"{pct(r.get('export_test_top1'))}")
    return f"{seeds_pct(r)}, fake-quant{exported}"
  if source is None:
    return top1
  if source == "integer":
    ort = r.get("test_top1_onnxruntime")
    return (f"{top1}, integer model (fake-quant {pct(r.get('test_top1_fake_quant'))}"
            + (f", onnxruntime {pct(ort)}" if ort is not None else "") + ")")
  if r.get("integer_error"):
    return f"{top1}, fake-quant (no integer model: {r['integer_error']})"
  return f"{top1}, fake-quant (not exported, --noexport)"


def accuracy_rows(results: dict[str, Any], cost: str, to_budget: str) -> list[tuple]:
  """The fine-tune's rows of the accuracy table: fake-quant, then the integer model.

  Args:
    results: the run's results.json.
    cost, to_budget: the policy's cost and cost / budget, as shown.
  """
  r = results
  fake = r.get("test_top1_fake_quant", r.get("test_top1"))
  rows = [("after fine-tune" + (" (fake-quant)" if "test_top1_source" in r else ""),
           "test / val", f"{pct(fake)} / {pct(r.get('val_top1'))} "
           f"(top-5 {pct(r.get('test_top5'))})", cost, to_budget)]
  if r.get("test_top1_source") == "integer":
    ort = r.get("test_top1_onnxruntime")
    rows.append((f"integer model ({r.get('export')}/)", "test",
                 pct(r["test_top1"]) + (f" (onnxruntime {pct(ort)})" if ort is not None
                                        else ""), cost, to_budget))
  return rows


def _read_export(workdir: str, folder: str) -> dict[str, Any]:
  path = os.path.join(workdir, folder, "results.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def blocks(results: dict[str, Any], workdir: str) -> list[tuple]:
  """The "Integer model" section: what was deployed, or why nothing was.

  Lists the files of `export/` with their sizes and the packed weights'
  size against `sum(bits x params) / 8` plus scales and biases. Empty for
  runs from before the export stage.
  """
  r = results
  if "test_top1_source" not in r:
    return []
  out: list[tuple] = [("h", 2, "Integer model")]
  if r.get("integer_error"):
    return out + [("p", f"No integer model: {r['integer_error']}. The test top-1 "
                        "reported is the fake-quant model's.")]
  if not r.get("export"):
    return out + [("p", "Not exported (--noexport): the test top-1 reported is the "
                        "fake-quant model's. `python -m experiments.imagenet "
                        "--mode=export --init_from=WORKDIR/finetune --workdir=OUT` "
                        "exports it.")]
  done = _read_export(workdir, r["export"])
  listed = ", ".join(f"{name} ({units.format_cost(size, 'B')})"
                     for name, size in done.get("files", {}).items())
  out.append(("p", f"The test top-1 reported is the integer model's (integer codes, "
                   f"int32 accumulation, fixed-point requantization), written to "
                   f"`{r['export']}/`: {listed or 'no files'}."))
  for name, why in done.get("skipped", {}).items():
    out.append(("p", f"{name} not written: {why}."))
  if done.get("packed_over_ideal") is not None:
    out.append(("p", f"Packed weights (weights.bin): "
                     f"{units.format_cost(done['packed_weight_bytes'], 'B')}, "
                     f"{done['packed_over_ideal']:.4f} x sum(bits x params) / 8 plus "
                     f"the scales and biases "
                     f"({units.format_cost(done['ideal_weight_bytes'], 'B')})."))
  return out
