"""Tests of `python -m experiments.rl_reward`: HAQ's reward against a comparison."""

import json
import os

import pytest

import launcher_testing as lt
from experiments import compare
from experiments import rl_reward


def test_agreement_counts_pairs_by_the_gap_of_their_final_figures():
  final = [90.0, 90.3, 91.0, 93.0]
  # Pairs (gap): 0-1 (0.3) alike, 1-2 (0.7) reversed, 0-2 (1.0), 1-3 (2.7),
  # 2-3 (2.0) alike, 0-3 (3.0) alike.
  got = rl_reward.agreement([1.0, 3.0, 2.0, 4.0], final)
  assert [(b["pairs"], b["alike"]) for b in got["bins"]] == [
      (1, 1.0), (1, 0.0), (3, 1.0), (1, 1.0)]
  # Ranks 1 3 2 4 against 1 2 3 4: 1 - 6 * 2 / (4 * 15).
  assert got["spearman"] == pytest.approx(0.8)
  # A reward tie counts half (0-1), 0-2 is alike; 1-2, within 0.2 points,
  # is left out.
  tied = rl_reward.agreement([5.0, 5.0, 6.0], [90.0, 91.0, 91.1])
  assert [(b["pairs"], b["alike"]) for b in tied["bins"]] == [
      (0, None), (0, None), (2, 0.75), (0, None)]


def _write(path, obj, lines=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    if lines:
      f.write("".join(json.dumps(o) + "\n" for o in obj))
    else:
      json.dump(obj, f)


def _cell(root, budget, rl_bits, hawq_bits, finals, *, seed=0, finished=True):
  """A cell with one RL search (two episodes, the second the best), HAWQ's
  and greedy's policies and their rows."""
  cell = os.path.join(root, "cells", "bitfusion", "latency", budget)
  names = ["a", "b"]
  episodes = [{"episode": 0, "reward": -3.0, "top1": 60.0, "w_bits": [2, 2], "a_bits": [2, 2]},
              {"episode": 1, "reward": -1.0, "top1": 80.0, "w_bits": rl_bits[0],
               "a_bits": rl_bits[1]}]
  _write(os.path.join(cell, "rl", f"seed_{seed}", "rl_search", "episodes.jsonl"), episodes,
         lines=True)
  if finished:
    _write(os.path.join(cell, "rl", f"seed_{seed}", "search.json"),
           {"names": names, "w_bits": rl_bits[0], "a_bits": rl_bits[1]})
  for family, bits in (("hawq", hawq_bits), ("greedy", ([2, 2], [2, 2]))):
    _write(os.path.join(cell, family, f"seed_{seed}", "search.json"),
           {"names": names, "w_bits": bits[0], "a_bits": bits[1]})
  for family, top1 in finals.items():
    bits = {"rl": rl_bits, "hawq": hawq_bits}.get(family, ([2, 2], [2, 2]))
    _write(os.path.join(cell, "rows", f"{family}.json"),
           {"seeds": [seed], "members": [top1],
            "policies": [{"w_bits": bits[0], "a_bits": bits[1]}]})


def test_rl_searches_read_the_best_episode_and_the_cells_other_policies(tmp_path):
  root = str(tmp_path)
  # w3a3: HAWQ's policy has more bits (the fake reward below: their sum).
  _cell(root, "w3a3", ([3, 3], [3, 3]), ([4, 4], [4, 4]),
        {"rl": 88.0, "hawq": 89.0, "greedy": 85.0})
  # w4a4: the agent's policy has the higher reward, yet the lower final top-1.
  _cell(root, "w4a4", ([5, 5], [5, 5]), ([4, 4], [4, 4]),
        {"rl": 90.0, "hawq": 91.0, "greedy": 85.0})  # One (policy, seed), one figure.
  _cell(root, "w4a4", ([5, 5], [5, 5]), ([4, 4], [4, 4]), {}, seed=1, finished=False)
  records = rl_reward.rl_searches(root)
  assert [(r["cell"], r["seed"]) for r in records] == [
      ("bitfusion/latency/w3a3", 0), ("bitfusion/latency/w4a4", 0)]  # Seed 1 unfinished.
  first = records[0]
  assert first["family"] == "rl" and first["best_episode"] == 1
  assert first["episode_top1"] == 80.0 and first["episodes"] == 2
  assert first["policies"] == {"rl": [[3, 3], [3, 3]], "hawq": [[4, 4], [4, 4]],
                               "greedy": [[2, 2], [2, 2]]}
  assert first["final"] == {"rl": 88.0, "hawq": 89.0, "greedy": 85.0}
  for r in records:
    r["reward"] = {n: float(sum(b[0]) + sum(b[1])) for n, b in r["policies"].items()}
  summary = {s["budget"]: s for s in rl_reward.search_summary(records)}
  assert summary["w3a3"] == {"family": "rl", "budget": "w3a3", "searches": 1, "missed": 1,
                             "missed_by_median": 4.0, "missed_by_max": 4.0, "higher": 0,
                             "higher_but_lower_final": 0, "ties": 0}
  assert summary["w4a4"]["missed"] == 0 and summary["w4a4"]["higher"] == 1
  assert summary["w4a4"]["higher_but_lower_final"] == 1
  finals = rl_reward.final_top1(root)
  assert finals["w3-3_a3-3"] == {0: 88.0} and finals["w2-2_a2-2"] == {0: 85.0}


def test_a_diverged_fine_tune_has_no_final_figure(tmp_path):
  root = str(tmp_path)
  _cell(root, "w3a3", ([3, 3], [3, 3]), ([4, 4], [4, 4]),
        {"rl": 88.0, "hawq": None, "greedy": 85.0})
  (record,) = rl_reward.rl_searches(root)
  assert record["final"] == {"rl": 88.0, "greedy": 85.0}
  assert "w4-4_a4-4" not in rl_reward.final_top1(root)
  record["reward"] = {"rl": 2.0, "hawq": 1.0, "greedy": 1.0}
  (line,) = rl_reward.search_summary([record])
  assert line["higher"] == 1 and line["higher_but_lower_final"] == 0


def test_on_a_quick_comparison_the_reward_reads_as_the_search_scored_it(tmp_path_factory):
  flags, folder = lt.digits_fp32(tmp_path_factory, "rl_reward")
  value = dict(f[2:].split("=", 1) for f in flags if "=" in f)
  grid = compare.check_grid("digits", ["bismo-edge"], ["latency"], ["w3a3"], ["rl"],
                            "minmax", 2, quick=True, init_from=value["init_from"],
                            data_dir=value["data_dir"])
  compare.run(grid, str(folder))
  # The reward read after 4 of 6 steps (the quick recipe's 4): each search's
  # best episode scores again as it did in the search.
  got = rl_reward.run(str(folder), "digits", "minmax", init_from=value["init_from"],
                      data_dir=value["data_dir"], policies=2, steps=(2, 6), quick=True)
  assert got["reward_steps"] == 4 and got["steps"] == [2, 6]
  assert [r["seed"] for r in got["searches"]] == [0, 1]
  for r in got["searches"]:
    assert r["reward"]["rl"] == r["episode_top1"], r["cell"]
    assert set(r["final"]) == {"rl"}
  assert len(got["policies"]) == 2
  for p in got["policies"]:
    assert set(p["reward"]) == {"2", "6"} and 0.0 <= p["reward"]["6"] <= 100.0
  assert set(got["fidelity"]) == {"2", "6"}
  saved = json.loads((folder / "digits_minmax_quick" / "rl_reward.json").read_text())
  assert saved["search_summary"] == got["search_summary"]


def test_a_comparison_that_is_not_there_is_one_line_and_exit_2(tmp_path):
  proc = lt.launch(f"--workdir={tmp_path}", "--quantizer=lsq", module="experiments.rl_reward",
                   timeout=120)
  lt.assert_one_line_error(proc, f"--workdir={tmp_path}: no comparison of recipe "
                           "'quickstart' with --quantizer=lsq there")
  proc = lt.launch("--steps=20,-1", module="experiments.rl_reward", timeout=120)
  lt.assert_one_line_error(proc, "--steps=20,-1; allowed: step counts >= 0")
