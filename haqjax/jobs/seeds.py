"""The export stage of fine-tunes over K seeds (`haqjax.train.seeds`).

Only member 0 (`--seed`) is exported as an integer model, or, where it
diverged, the first member that did not (`seeds.exported_member`): the K
members share their policy and recipe, and one deployed model is what a user
ships. The run's `test_top1` stays the members' (fake-quant) mean, so it
compares with other K-seed runs; the exported member's integer figure is
reported beside it:

  export_member            its index (0 unless member 0 diverged)
  export_seed              its seed
  export_test_top1         its final test top-1 (the integer model's
                           when it was exported)
  export_test_top1_source  'integer' or 'fake_quant'
"""

from __future__ import annotations

import json
import os
from typing import Any

from haqjax import io as haq_io
from haqjax.jobs import export as export_lib
from haqjax.train import seeds as seeds_lib
from haqjax.train.config import Config


def seeds_top1(finetuned: dict[str, Any], member: dict[str, Any]) -> dict[str, Any]:
  """`export_lib.final_top1`'s keys for K seeds, of which one member was exported.

  Args:
    finetuned: the K-seed results (`haqjax.train.seeds`; `test_top1` the mean).
    member: `final_top1`'s keys of the exported member (`seeds.exported_member`;
      after its export, or without one).

  Returns:
    `member`'s keys with `test_top1` and `test_top1_fake_quant` the members'
    mean and `test_top1_source` 'fake_quant' (only one member has an integer
    model), and the `export_*` keys of the module docstring.
  """
  k = seeds_lib.exported_member(finetuned)
  return {**member, "test_top1": finetuned["test_top1"],
          "test_top1_fake_quant": finetuned["test_top1"], "test_top1_source": "fake_quant",
          "export_member": k, "export_seed": finetuned["seeds"][k],
          "export_test_top1": member["test_top1"],
          "export_test_top1_source": member["test_top1_source"]}


def finish_seeds(config: Config, workdir: str, results: dict[str, Any]) -> dict[str, Any]:
  """`export_lib.finish_run` for a finished K-seed `qat` run: one member is exported.

  That member's folder (`seed_S/`) gets `export/` and its results.json the
  integer keys; the run's results.json (rewritten atomically) gets
  `seeds_top1`'s keys, `export` relative to `workdir`.

  Returns:
    `results` with those keys.
  """
  workdir = os.path.abspath(workdir)
  first = results["members"][seeds_lib.exported_member(results)]
  directory = os.path.join(workdir, first["directory"])
  with open(os.path.join(directory, "results.json")) as f:
    member = export_lib.finish_run(config.replace(seed=first["seed"]), directory,
                                   json.load(f))
  # finish_run merged final_top1's keys into the member's results.
  top1 = seeds_top1(results, {k: member.get(k)
                              for k in export_lib.final_top1(member, None)})
  if top1["export"] is not None:
    top1["export"] = os.path.join(first["directory"], top1["export"])
  results = {**results, **top1}
  haq_io.write_json(os.path.join(workdir, "results.json"), results)
  return results
