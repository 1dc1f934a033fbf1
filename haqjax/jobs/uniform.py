"""Uniform policies beside a search's: "is the found policy better than uniform?"

A budget written as a ratio of a uniform network (`--budget=1.0
--budget_reference=w4a4`: "no more than uniform W4A4's latency") names the
policy every reader compares the search's with. The rl and gumbel jobs run
one more stage for it, after their own fine-tune:

  uniform_reference/  policy.json and finetune/ of that uniform policy: the
                      same QAT recipe (`stages.finetune`) from the same FP32
                      weights, with the wall's fixed first/last layers applied
                      as for the search's policy; resumable, reused when the
                      workdir already holds it, skipped with
                      --nofinetune_uniform_reference

and results.json gets its figures (`uniform_reference`,
`delta_test_top1_vs_uniform`) beside the found policy's (the reference is
exported as the found policy is, to `uniform_reference/export/`, so both test
top-1s are the integer models' unless --noexport), together with the
points of `--uniform_results` (`uniform_points`); `plots/uniform.png` draws
them all, test top-1 against cost. The sweep job fine-tunes its
`--uniform_policies` with the same `finetune_uniform`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any

import numpy as np

from haqjax import hardware
from haqjax import report
from haqjax import units
from haqjax.jobs import stages
from haqjax.policy import Policy
from haqjax.search.config import SearchConfig
from haqjax.train import seeds as seeds_lib
from haqjax.train.config import Config

UNIFORM = re.compile(r"^w([1-8])a([1-8])$")
REFERENCE_DIR = "uniform_reference"


def bits_of(name: str) -> tuple[int, int]:
  """`(w, a)` bits of a uniform policy's name, 'wXaY'."""
  m = UNIFORM.match(name)
  if not m:
    raise ValueError(f"uniform policy {name!r}; allowed: wXaY with X, Y in 1..8, "
                     "e.g. w4a4")
  return int(m.group(1)), int(m.group(2))


def policy_of(wall, names, name: str) -> Policy:
  """Uniform `name` over layers `names`, the wall's fixed layers applied."""
  w, a = bits_of(name)
  n = len(names)
  return Policy.create(names, *wall.fixed.apply(np.full(n, w), np.full(n, a)))


def cost_of(wall, name: str) -> float:
  """The network cost of uniform `name` (fixed layers applied), in the metric's unit."""
  w, a = bits_of(name)
  n = len(wall.fixed.w)
  return wall.cost(*wall.fixed.apply(np.full(n, w), np.full(n, a)))


def widest_fitting(wall, names, floor: tuple[int, int] | None = None) -> Policy:
  """The uniform `wXaY` with the most bits within the wall's budget, at least `floor`.

  Every layer gets the same `X`-bit weights and `Y`-bit activations (the
  wall's fixed layers applied), with `floor[0] <= X` and `floor[1] <= Y`
  inside the wall's bit range; of those that fit, the one with the most bits
  `X + Y`, then the most balanced, then the one with more weight bits. With
  the budget's own reference as the floor this is a uniform policy at least
  as wide as it in both roles and no dearer: the reference itself where
  every bit costs, a wider one where a target's cost does not fall with some
  bits (a bit-parallel systolic array computes in 8 bits; a crossbar senses
  each column once per input bit whatever the weight's; a size budget counts
  no activation bits). That is the uniform point a mixed policy must beat.

  Args:
    wall: the budget (`env.BudgetWall`).
    names: the layer names.
    floor: the least `(X, Y)`; default the wall's lowest bits.
  """
  n = len(names)
  lo_w, lo_a = floor or (wall.min_bits, wall.min_bits)
  pairs = sorted(((w, a) for w in range(max(lo_w, wall.min_bits), wall.max_bits + 1)
                  for a in range(max(lo_a, wall.min_bits), wall.max_bits + 1)),
                 key=lambda p: (p[0] + p[1], min(p), p[0]), reverse=True)
  for w, a in pairs:
    bits = wall.fixed.apply(np.full(n, w), np.full(n, a))
    if wall.fits(*bits):
      return Policy.create(names, *bits)
  raise ValueError(f"no uniform policy of at least W{lo_w}A{lo_a} fits budget "
                   f"{wall.budget}; allowed: a floor whose uniform policy fits")


def reference_name(search: SearchConfig) -> str | None:
  """The uniform policy a ratio budget refers to ('w4a4'), or None (fp32, absolute)."""
  if search.budget_kind != "ratio" or not UNIFORM.match(search.budget_reference):
    return None
  return search.budget_reference


def _read_json(path: str, flag: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise ValueError(f"{flag}={path!r} does not exist")
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{flag}={path!r} is not JSON: {e}") from None
  if not isinstance(data, dict):
    raise ValueError(f"{flag}={path!r} holds a {type(data).__name__}; expected an "
                     'object such as {"w4a4": 90.97}')
  return data


def read_results(path: str, wall) -> list[dict[str, Any]]:
  """Uniform points `{label, group, cost, top1, source}` of a `--uniform_results` file.

  The file maps uniform policies to their test top-1, `{"w4a4": 90.97}`, or
  to `{"test_top1": ..., "cost": ...}` (cost in the budget metric's unit;
  without it, the wall's cost of the uniform policy).

  Raises:
    ValueError: for a missing or unreadable file, a name that is not wXaY or
      a value without a test top-1 number.
  """
  points = []
  for name, value in _read_json(path, "--uniform_results").items():
    bits_of(name)
    top1 = value.get("test_top1") if isinstance(value, dict) else value
    if isinstance(top1, bool) or not isinstance(top1, (int, float)):
      raise ValueError(f"--uniform_results={path!r}: {name} has no test_top1 number")
    cost = value.get("cost") if isinstance(value, dict) else None
    points.append({"label": name, "group": "uniform", "top1": float(top1),
                   "cost": float(cost) if cost is not None else cost_of(wall, name),
                   "source": path})
  return points


def check(search: SearchConfig, wall) -> None:
  """The uniform inputs' checks, before any training (`--uniform_results`)."""
  if search.uniform_results:
    read_results(search.uniform_results, wall)


def finetune_uniform(config: Config, search: SearchConfig, setup: stages.Setup,
                     name: str, directory: str, seeds: int = 1) -> dict[str, Any]:
  """Fine-tunes and tests uniform `name` in `directory` with the search's recipe.

  `directory` gets `policy.json` (the uniform bits, the wall's fixed layers
  applied, with cost and budget) and `finetune/` (`stages.finetune`: the
  final fine-tune's epochs and learning rate from the FP32 weights), so a
  finished one is read back, not trained again. `seeds` K > 1: K seeds as
  one vmapped job; its figures are then the members' means, with their
  `test_top1_mean/_std/_members` (and val's) beside them.

  Returns:
    The uniform policy's figures: name, cost (the metric's SI unit),
    cost_ratio (to the budget's reference), fits, layer_costs, policy (its
    layers), test/val top-1, the fine-tune's seconds and `directory`.
  """
  usetup = dataclasses.replace(setup, workdir=directory, timings={})
  os.makedirs(directory, exist_ok=True)
  wall = setup.wall
  upolicy = policy_of(wall, setup.table.names, name)
  path, cost = (os.path.join(directory, "policy.json"),
                wall.describe(upolicy.w_bits, upolicy.a_bits))
  if not finished(directory):  # A finished one is left as it is, files and times.
    path, cost = stages.save_search_policy(config, search, usetup, upolicy,
                                           {"algorithm": "uniform", "policy": name})
  done = stages.finetune(config, search, usetup, path, seeds)
  return {
      "name": name, "cost": cost["cost"], "cost_ratio": cost["ratio"],
      "fits": bool(wall.fits(upolicy.w_bits, upolicy.a_bits)),
      "layer_costs": [float(c) for c in wall.layer_costs(upolicy.w_bits, upolicy.a_bits)],
      "policy": upolicy.to_dict()["layers"],
      "test_top1": done["test_top1"], "test_top5": done.get("test_top5"),
      "val_top1": done.get("val_top1"),
      "finetune_seconds": usetup.timings["finetune_seconds"], "directory": directory,
      **seeds_lib.summary_keys(done),
  }


def finished(directory: str) -> bool:
  """Whether `directory` holds a finished uniform fine-tune."""
  return os.path.exists(os.path.join(directory, "finetune", "results.json"))


def reference_stage(config: Config, search: SearchConfig, setup: stages.Setup,
                    export: bool = False, seeds: int = 1) -> dict[str, Any] | None:
  """The `uniform_reference/` stage: the budget's uniform policy fine-tuned.

  None when the budget refers to no uniform policy, or when
  `finetune_uniform_reference` is off and the workdir holds no finished one.
  With `export`, its integer model goes to `uniform_reference/export/` and
  its `test_top1` is that model's (`stages.export_stage`). Adds
  `uniform_reference_seconds` to `setup.timings`.
  """
  name = reference_name(search)
  directory = os.path.join(setup.workdir, REFERENCE_DIR)
  if name is None or not (search.finetune_uniform_reference or finished(directory)):
    return None
  if not finished(directory):
    unit = hardware.base.UNITS[search.budget_metric]
    print(f"fine-tune uniform {name} (the budget's reference, "
          f"{units.format_cost(cost_of(setup.wall, name), unit)})",
          file=sys.stderr, flush=True)
  reference = finetune_uniform(config, search, setup, name, directory, seeds)
  setup.timings["uniform_reference_seconds"] = reference["finetune_seconds"]
  top1 = stages.export_stage(config, setup, directory, reference, export,
                             timing="uniform_reference_seconds")
  return {**reference, **top1, "directory": REFERENCE_DIR}


def top1_delta(found: dict[str, Any], reference: dict[str, Any]) -> float:
  """Found minus uniform test top-1, in points, on figures of the same kind.

  Both integer models' when both were exported; the fake-quant figures when
  only one was (its engine could not express the other model).
  """
  if found.get("test_top1_source") == reference.get("test_top1_source"):
    return found["test_top1"] - reference["test_top1"]
  return found["test_top1_fake_quant"] - reference["test_top1_fake_quant"]


def comparison(config: Config, search: SearchConfig, setup: stages.Setup,
               finetuned: dict[str, Any], cost: float, export: bool = False,
               seeds: int = 1) -> dict[str, Any]:
  """Runs the reference stage; the results.json keys that compare with uniform.

  Args:
    config, search, setup: the job's.
    finetuned: the found policy's test top-1 keys (`stages.export_stage`'s,
      or the fine-tune's results).
    cost: the found policy's cost, in the budget metric's unit.
    export: export the reference's integer model too, as the found one was.
    seeds: fine-tune the reference over this many seeds, as the found one was.

  Returns:
    `uniform_reference` (its figures, or None), `delta_test_top1_vs_uniform`
    (found minus uniform test top-1, in points), `delta_cost_vs_uniform`
    (found minus uniform cost) and `uniform_points` (the `--uniform_results`
    points); the deltas are None without a reference.
  """
  reference = reference_stage(config, search, setup, export, seeds)
  points = (read_results(search.uniform_results, setup.wall)
            if search.uniform_results else [])
  found = reference is not None
  return {
      "uniform_reference": reference,
      "delta_test_top1_vs_uniform": top1_delta(finetuned, reference) if found else None,
      "delta_cost_vs_uniform": cost - reference["cost"] if found else None,
      "uniform_points": points,
  }


def reference_bits(search: SearchConfig) -> dict[str, Any] | None:
  """`{label, w_bits, a_bits}` of the budget's uniform reference, for the bits plot."""
  name = reference_name(search)
  if name is None:
    return None
  w, a = bits_of(name)
  return {"label": f"uniform {name.upper()} (budget reference)", "w_bits": w, "a_bits": a}


def plot_comparison(workdir: str, results: dict[str, Any], search: SearchConfig,
                    label: str) -> str | None:
  """plots/uniform.png: test top-1 against cost, found policy and uniform points.

  Drawn when results hold a uniform reference or `--uniform_results` points;
  returns the path, or None when there is nothing to compare with.
  """
  reference = results.get("uniform_reference")
  points = results.get("uniform_points") or []
  if reference is None and not points:
    return None
  path = os.path.join(workdir, "plots", "uniform.png")
  unit = hardware.base.UNITS[search.budget_metric]
  return report.plot_versus_uniform(
      path, {"label": label, "cost": results["cost"], "top1": results["test_top1"]},
      None if reference is None else {"label": reference["name"], "cost": reference["cost"],
                                      "top1": reference["test_top1"]},
      [{"label": p["label"], "cost": p["cost"], "top1": p["top1"]} for p in points],
      metric=search.budget_metric, unit=unit, limit=results.get("limit"),
      title=f"{label} vs uniform: {results['model']}, {results['budget']}")
