r"""HAQ's episode reward, checked against a comparison's fine-tuned results.

  python -m experiments.rl_reward --workdir=WORKDIR [--recipe=quickstart] \
      [--quantizer=minmax|lsq|lsq_mse] [--init_from=FP32_WORKDIR] [--policies=100] \
      [--steps=20,60,200] [--quick] [--out=PATH]

Reads what `python -m experiments.compare` wrote with the same `--workdir`,
`--recipe`, `--quantizer` (and `--quick`), and asks two questions of the RL
family's reward, the held-out top-1 after a short QAT fine-tune
(`haqjax.search.scoring.QATScorer`, built as the family builds it):

1. Does it rank policies as their final fine-tune does? Up to `--policies` of
   the comparison's fine-tuned policies (a seeded sample) are scored by the
   first seed's reward, read after each of `--steps` steps of one fine-tune,
   against each policy's final test top-1 (the mean over its fine-tuned
   seeds): Spearman's rho, and the share of policy pairs that the reward
   orders as the final figures do, by how far apart those are (pairs closer
   than 0.2 points, within seed noise, are left out).
2. Does the agent find what its reward ranks best? For every RL search of
   the grid (a family folder with `rl_search/`: `rl`, `rl_executed`, `rl_saving`), seed s:
   the best episode's reward top-1, that policy scored again (the reward is
   deterministic, so the two agree), and the same cell's HAWQ and greedy
   policies of seed s under seed s's reward; beside them each family's final
   top-1 for seed s. Where another family's policy scores higher, the agent
   missed a policy its own reward prefers; where the agent's scores higher
   but ends lower, the reward misranked them.

Writes `<workdir>/<recipe>_<quantizer>[_quick]/rl_reward.json` (or `--out`)
atomically and prints both tables.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import random
import statistics
import types
from typing import Any, Sequence

from absl import flags

from experiments import cli
from experiments import families

# Pairs by the gap of their final top-1 (points): the lowest edge leaves out
# pairs within seed-to-seed noise.
GAP_BINS = ((0.2, 0.5), (0.5, 1.0), (1.0, 3.0), (3.0, float("inf")))
OTHERS = ("hawq", "greedy")


def final_top1(root: str) -> dict[str, dict[int, float]]:
  """Every fine-tuned policy of the comparison's rows: key -> {seed: test top-1}."""
  finals: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(root, "cells", "*", "*", "*", "rows",
                                            "*.json"))):
    with open(path) as f:
      row = json.load(f)
    for seed, policy, top1 in zip(row["seeds"], row["policies"], row["members"]):
      if top1 is None:  # Its fine-tune diverged.
        continue
      key = families.policy_key(types.SimpleNamespace(**policy))
      finals.setdefault(key, {})[seed] = top1
  return finals


def agreement(reward: Sequence[float], final: Sequence[float]) -> dict[str, Any]:
  """Spearman's rho of `reward` against `final`, and per `GAP_BINS` bin the
  pairs ordered alike (a reward tie counts as half)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  bins = []
  for lo, hi in GAP_BINS:
    pairs = alike = 0.0
    for i, j in itertools.combinations(range(len(final)), 2):
      gap = final[i] - final[j]
      if lo <= abs(gap) < hi:
        pairs += 1
        d = (reward[i] - reward[j]) * gap
        alike += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    bins.append({"gap": [lo, hi], "pairs": int(pairs),
                 "alike": alike / pairs if pairs else None})
  rho = float(stats.spearmanr(reward, final)[0]) if len(final) > 2 else None
  return {"spearman": rho, "bins": bins}


def rl_searches(root: str) -> list[dict[str, Any]]:
  """Every finished RL search of the grid: cell, family, seed, its best
  episode and the cell's HAWQ and greedy policies and final top-1 of that seed."""
  from haqjax.jobs.stages import read_json  # pylint: disable=g-import-not-at-top
  out = []
  pattern = os.path.join(root, "cells", "*", "*", "*", "*", "seed_*", "rl_search",
                         "episodes.jsonl")
  for path in sorted(glob.glob(pattern)):
    seed_dir = os.path.dirname(os.path.dirname(path))
    family_dir = os.path.dirname(seed_dir)
    cell_dir, family = os.path.dirname(family_dir), os.path.basename(family_dir)
    seed = int(os.path.basename(seed_dir)[len("seed_"):])
    found = read_json(os.path.join(seed_dir, "search.json"))
    if found is None:  # The search has not finished.
      continue
    with open(path) as f:
      episodes = [json.loads(line) for line in f if line.strip()]
    best = max(episodes, key=lambda e: e["reward"])
    record = {"cell": os.path.relpath(cell_dir, os.path.join(root, "cells")),
              "family": family, "seed": seed, "names": found["names"],
              "episodes": len(episodes), "best_episode": best["episode"],
              "policies": {family: [best["w_bits"], best["a_bits"]]},
              "episode_top1": best["top1"], "final": {}}
    for other in OTHERS:
      searched = read_json(os.path.join(cell_dir, other, f"seed_{seed}", "search.json"))
      if searched is not None:
        record["policies"][other] = [searched["w_bits"], searched["a_bits"]]
    for name in (family, *OTHERS):
      row = read_json(os.path.join(cell_dir, "rows", f"{name}.json"))
      top1 = (row["members"][row["seeds"].index(seed)]
              if row is not None and seed in row["seeds"] else None)
      if top1 is not None:  # None: not fine-tuned, or its fine-tune diverged.
        record["final"][name] = top1
    out.append(record)
  return out


def search_summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per RL family and budget: the searches where HAWQ's or greedy's policy
  has the higher reward than the agent's best (the search missed it), and
  where the agent's has it yet the lower final top-1 (the reward misranked)."""
  lines = []
  for family, budget in sorted({(r["family"], r["cell"].rsplit("/", 1)[-1])
                                for r in records}):
    rows = [r for r in records
            if r["family"] == family and r["cell"].endswith("/" + budget)]
    missed = misranked = ties = 0
    gaps = []
    for r in rows:
      other = max((r["reward"][o] for o in OTHERS if o in r["reward"]), default=None)
      if other is None:
        continue
      gap = other - r["reward"][r["family"]]
      if gap > 0:
        missed += 1
        gaps.append(gap)
      elif gap == 0:
        ties += 1
      else:
        finals = [r["final"][o] for o in OTHERS if o in r["final"]]
        misranked += bool(finals) and r["final"].get(r["family"], float("inf")) < max(finals)
    lines.append({"family": family, "budget": budget, "searches": len(rows),
                  "missed": missed,
                  "missed_by_median": statistics.median(gaps) if gaps else None,
                  "missed_by_max": max(gaps) if gaps else None,
                  "higher": len(rows) - missed - ties, "higher_but_lower_final": misranked,
                  "ties": ties})
  return lines


def run(workdir: str, recipe: str, quantizer: str, *, init_from: str | None = None,
        data_dir: str | None = None, policies: int = 100, steps: Sequence[int] = (20,),
        quick: bool = False, out: str | None = None, seed: int = 0) -> dict[str, Any]:
  """Both checks on a finished (or partly finished) comparison; see the module doc."""
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import rl as rl_job  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  root = os.path.join(workdir, f"{recipe}_{quantizer}{'_quick' if quick else ''}")
  if not os.path.isdir(os.path.join(root, "cells")):
    raise ValueError(f"--workdir={workdir}: no comparison of recipe {recipe!r} with "
                     f"--quantizer={quantizer} there ({root}/cells is missing)")
  fp32_dir = os.path.abspath(init_from or os.path.join(
      workdir, f"{recipe}_fp32{'_quick' if quick else ''}"))
  plan = families.QUICK if quick else families.FULL
  config, search, _, _ = families.configs(quantizer, "w4a4", plan, fp32_dir, data_dir,
                                          recipe=recipe)
  reward_steps = search.search_finetune_steps
  steps = sorted(set(steps))
  searches = rl_searches(root)
  finals = final_top1(root)
  if not finals:
    raise ValueError(f"--workdir={workdir}: the comparison in {root} has no finished row")
  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         manual_dir=config.manual_dir, val_size=config.val_size,
                         split_seed=config.split_seed)
  longest = max(steps[-1], reward_steps)
  scorers: dict[int, Any] = {}

  def score(names, bits, s, at):
    if s not in scorers:  # Seed s's reward, as the RL family builds it.
      scorers[s] = rl_job.make_scorer(config.replace(seed=s),
                                      search.replace(search_finetune_steps=longest),
                                      splits, fp32_dir)
    policy = Policy.create(names, bits[0], bits[1])
    return {k: v["top1"] for k, v in scorers[s].scores(policy, at).items()}

  names = (searches[0]["names"] if searches else _any_names(root))
  first_seed = config.seed
  keys = sorted(finals)
  sample = sorted(random.Random(seed).sample(keys, min(policies, len(keys))))
  scored = []
  for key in sample:
    w, a = key[1:].split("_a")
    bits = ([int(b) for b in w.split("-")], [int(b) for b in a.split("-")])
    top1 = score(names, bits, first_seed, steps)
    final = finals[key]
    scored.append({"policy": key, "final": sum(final.values()) / len(final),
                   "final_seeds": final, "reward": {str(k): v for k, v in top1.items()}})
    print(f"{key}: final {scored[-1]['final']:.2f}, reward "
          + ", ".join(f"{v:.2f} at {k}" for k, v in top1.items()), flush=True)
  fidelity = {str(k): agreement([p["reward"][str(k)] for p in scored],
                                [p["final"] for p in scored]) for k in steps}
  for record in searches:
    record["reward"] = {}
    for name, bits in record["policies"].items():
      record["reward"][name] = score(record["names"], bits, record["seed"],
                                     (reward_steps,))[reward_steps]
    print(f"{record['cell']} {record['family']} seed {record['seed']}: reward "
          + ", ".join(f"{n} {v:.2f}" for n, v in record["reward"].items())
          + f" (best episode {record['episode_top1']:.2f}); final "
          + ", ".join(f"{n} {v:.2f}" for n, v in record["final"].items()), flush=True)
  result = {"root": root, "quantizer": quantizer, "reward_steps": reward_steps,
            "fidelity_seed": first_seed, "steps": steps, "policies": scored,
            "fidelity": fidelity, "searches": searches,
            "search_summary": search_summary(searches)}
  path = out or os.path.join(root, "rl_reward.json")
  haq_io.write_json(path, result)
  print(markdown(result), flush=True)
  print(path, flush=True)
  return result


def _any_names(root: str) -> list[str]:
  from haqjax.jobs.stages import read_json  # pylint: disable=g-import-not-at-top
  for path in sorted(glob.glob(os.path.join(root, "cells", "*", "*", "*", "*", "seed_*",
                                            "search.json"))):
    return read_json(path)["names"]
  raise ValueError(f"{root}: no search record names the model's layers")


def markdown(result: dict[str, Any]) -> str:
  """Both checks as markdown tables."""
  lines = [f"Reward ranking against the final top-1 ({len(result['policies'])} "
           "policies, pairs ordered alike by the gap of their final top-1):", "",
           "| reward after | Spearman | " + " | ".join(
               f"gap {lo:g}-{hi:g}" for lo, hi in GAP_BINS) + " |",
           "|---|---|" + "---|" * len(GAP_BINS)]
  for k, f in result["fidelity"].items():
    cells = [f"{b['alike']:.2f} ({b['pairs']})" if b["alike"] is not None else "-"
             for b in f["bins"]]
    rho = "-" if f["spearman"] is None else f"{f['spearman']:.3f}"
    lines.append(f"| {k} steps | {rho} | " + " | ".join(cells) + " |")
  lines += ["", "RL searches under their own reward (HAWQ's or greedy's policy scoring "
            "higher = missed; the agent's higher yet its final lower = misranked):", "",
            "| family | budget | searches | missed (median, max gap) | agent's higher | "
            "of those, final lower | ties |", "|---|---|---|---|---|---|---|"]
  for s in result["search_summary"]:
    gap = ("" if s["missed_by_median"] is None
           else f" ({s['missed_by_median']:.2f}, {s['missed_by_max']:.2f})")
    lines.append(f"| {s['family']} | {s['budget']} | {s['searches']} | {s['missed']}{gap} "
                 f"| {s['higher']} "
                 f"| {s['higher_but_lower_final']} | {s['ties']} |")
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("workdir", "compare", "The comparison's --workdir.")
  flags.DEFINE_string("recipe", "quickstart", "The comparison's --recipe.")
  flags.DEFINE_string("quantizer", "minmax",
                      "The comparison's --quantizer: minmax, lsq or lsq_mse.")
  flags.DEFINE_string("init_from", None, "The comparison's --init_from (default: the "
                      "FP32 run it trained in the workdir).")
  flags.DEFINE_string("data_dir", None, "Prepared datasets folder.")
  flags.DEFINE_integer("policies", 100, "Fine-tuned policies whose reward is compared "
                       "with their final top-1 (a seeded sample).")
  flags.DEFINE_list("steps", ["20", "60", "200"], "Fine-tune steps after which the "
                    "sampled policies' reward is read.")
  flags.DEFINE_bool("quick", False, "The comparison ran with --quick.")
  flags.DEFINE_string("out", None, "JSON output (default <root>/rl_reward.json).")
  flags.DEFINE_string("compilation_cache", "", "JAX persistent compilation cache "
                      "folder (empty: off).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; flags are --name=value")
  f = flags.FLAGS
  if f.quantizer not in families.QUANTIZERS:
    raise ValueError(f"--quantizer={f.quantizer}; allowed: "
                     f"{', '.join(families.QUANTIZERS)}")
  try:
    steps = [int(s) for s in f.steps]
  except ValueError:
    raise ValueError(f"--steps={','.join(f.steps)}; allowed: step counts >= 0") from None
  if not steps or min(steps) < 0:
    raise ValueError(f"--steps={','.join(f.steps)}; allowed: step counts >= 0")
  if f.policies < 0:
    raise ValueError(f"--policies={f.policies}; allowed: >= 0")
  cli.enable_compilation_cache(f.compilation_cache)
  cli.quiet_libraries()
  run(f.workdir, f.recipe, f.quantizer, init_from=f.init_from, data_dir=f.data_dir,
      policies=f.policies, steps=steps, quick=f.quick, out=f.out)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
