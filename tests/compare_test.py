"""Tests of `python -m experiments.compare` and `haqjax.report.comparison`."""

import csv
import glob
import json
import math
import os

import pytest

import launcher_testing as lt
from experiments import compare
from experiments import families
from haqjax.report import comparison

# Student's t quantile t_{0.975} with 2 degrees of freedom, from a printed table.
T_975_2 = 4.30265


def test_paired_difference_matches_a_hand_computed_interval():
  # Differences 1, 2, 3: mean 2, sample std 1, standard error 1 / sqrt(3).
  d = comparison.paired_difference([71.0, 72.5, 70.0], [70.0, 70.5, 67.0])
  assert d["n"] == 3
  assert d["mean"] == pytest.approx(2.0, abs=1e-12)
  assert d["std"] == pytest.approx(1.0, abs=1e-12)
  assert d["low"] == pytest.approx(2.0 - T_975_2 / math.sqrt(3), abs=1e-4)
  assert d["high"] == pytest.approx(2.0 + T_975_2 / math.sqrt(3), abs=1e-4)


def test_paired_difference_edge_cases():
  same = comparison.paired_difference([3.0, 4.0], [1.0, 2.0])  # Both differences 2.
  assert (same["low"], same["mean"], same["high"]) == (2.0, 2.0, 2.0)
  one = comparison.paired_difference([3.0], [1.0])
  assert one["mean"] == 2.0 and one["low"] is None and one["high"] is None
  with pytest.raises(ValueError, match="values has 2 figures and reference 1"):
    comparison.paired_difference([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="confidence is 1.0"):
    comparison.paired_difference([1.0, 2.0], [1.0, 2.0], confidence=1.0)


def _row(family, members, budget="w4a4"):
  return {"target": "t", "metric": "latency", "budget": budget, "family": family,
          "cost_ratio": 1.0, "members": members, "search_seconds": 0.5}


def test_table_pairs_each_family_with_its_budgets_uniform_row(tmp_path):
  lines = comparison.table([_row("uniform", [60.0, 62.0]), _row("hawq", [61.0, 65.0]),
                            _row("uniform", [50.0, 50.0], "w3a3"),
                            _row("rl", [49.0, 52.0], "w3a3")])
  assert [l["diff_mean"] for l in lines] == [None, 2.0, None, 0.5]
  assert lines[1]["top1_mean"] == 63.0 and lines[1]["top1_std"] == pytest.approx(math.sqrt(8))
  # Differences 1 and 3: half-width t_{0.975,1} * 1 (std sqrt(2) / sqrt(2)).
  assert lines[1]["ci_high"] - 2.0 == pytest.approx(12.7062, abs=1e-4)
  with pytest.raises(ValueError, match="t/latency/w2a2 has no uniform row"):
    comparison.table([_row("uniform", [1.0]), _row("hawq", [1.0], "w2a2")])
  text = open(comparison.write_markdown(str(tmp_path / "c.md"), lines)).read()
  assert "| t | latency | w4a4 | hawq | 1.000 | 63.00 | 2.83 | 61.00 65.00 | 0 | +2.00 |" in text
  with open(comparison.write_csv(str(tmp_path / "c.csv"), lines)) as f:
    rows = list(csv.DictReader(f))
  assert [r["family"] for r in rows] == ["uniform", "hawq", "uniform", "rl"]
  assert rows[0]["diff_mean"] == "" and float(rows[3]["diff_mean"]) == 0.5


@pytest.mark.parametrize("changes, message", [
    ({"targets": ["bismo-edge", "tpu"]}, "--targets has 'tpu'; allowed: bismo-edge,"),
    ({"metrics": ["speed"]}, "--metrics has 'speed'; allowed: latency,"),
    ({"budgets": ["w4a9"]}, "--budgets has 'w4a9'; allowed: wXaY with X, Y in 1..8"),
    ({"family_names": []}, "--families is empty; allowed: uniform, rl, gumbel,"),
    ({"quantizer": "pact"}, "--quantizer is 'pact'; allowed: minmax, lsq"),
    ({"seeds": 0}, "--seeds is 0; allowed: a positive integer"),
])
def test_check_grid_names_flag_value_and_allowed_ones(changes, message):
  args = {"recipe": "digits", "targets": ["bismo-edge"], "metrics": ["latency"],
          "budgets": ["w4a4"], "family_names": ["hawq"], "quantizer": "minmax",
          "seeds": 2, **changes}
  with pytest.raises(ValueError) as e:
    compare.check_grid(**args)
  assert str(e.value).startswith(message), str(e.value)


def test_check_grid_puts_uniform_first_and_counts_seeds():
  grid = compare.check_grid("digits", ["cim", "cim"], ["size"], ["w2a2"],
                            ["greedy", "uniform"], "lsq", 3)
  assert grid.targets == ("cim",) and grid.families == ("uniform", "greedy")
  assert grid.seeds == (0, 1, 2)


def test_a_bad_flag_is_one_line_and_exit_2():
  proc = lt.launch("--families=uniform,ga", module="experiments.compare", timeout=120)
  lt.assert_one_line_error(proc, "--families has 'ga'; allowed: uniform, rl, gumbel")


def _flag(flags, name):
  return next(f for f in flags if f.startswith(f"--{name}="))


def test_quick_comparison_pairs_seeds_and_resumes(tmp_path_factory):
  flags, folder = lt.digits_fp32(tmp_path_factory, "compare")
  args = ["--recipe=digits", _flag(flags, "data_dir"), _flag(flags, "compilation_cache"),
          _flag(flags, "init_from"), "--targets=bismo-edge", "--metrics=latency",
          "--budgets=w4a4", "--families=greedy,hawq,uniform_max,hawq_tensor", "--seeds=2",
          "--quick",
          f"--workdir={folder}"]
  lt.launch_ok(*args, module="experiments.compare")
  root = folder / "digits_minmax_quick"
  with open(root / "compare.csv") as f:
    rows = {r["family"]: r for r in csv.DictReader(f)}
  assert list(rows) == ["uniform", "greedy", "hawq", "uniform_max", "hawq_tensor"]
  members = {f: [float(v) for v in r["members"].split()] for f, r in rows.items()}
  uniform = members["uniform"]
  assert len(uniform) == 2 and float(rows["uniform"]["cost_ratio"]) == 1.0
  assert rows["uniform"]["diff_mean"] == ""
  # On bismo-edge every bit costs latency: the widest uniform policy within
  # uniform W4A4's latency is W4A4 itself, the same fine-tunes, nothing to pair.
  assert members["uniform_max"] == uniform and rows["uniform_max"]["diff_mean"] == ""
  cell = root / "cells" / "bismo-edge" / "latency" / "w4a4"
  # HAWQ and greedy share one pass per seed, per channel; the variant has its
  # own, per tensor.
  for seed in (0, 1):
    shared = json.loads((root / "sensitivity_channel" / f"seed_{seed}" / "sensitivity.json")
                        .read_text())
    own = json.loads((root / "sensitivity" / f"seed_{seed}" / "sensitivity.json").read_text())
    assert shared["estimator"]["granularity"] == "channel"
    assert "activation_channel_traces" in shared
    assert own["estimator"]["granularity"] == "tensor"
  for family in ("greedy", "hawq", "hawq_tensor"):
    row, diffs = rows[family], [a - b for a, b in zip(members[family], uniform)]
    assert float(row["diff_mean"]) == pytest.approx(sum(diffs) / 2, abs=1e-9)
    assert float(row["ci_low"]) <= float(row["diff_mean"]) <= float(row["ci_high"])
    assert float(row["cost_ratio"]) <= 1.0 + 1e-6  # Within the budget.
    saved = json.loads((cell / "rows" / f"{family}.json").read_text())
    assert saved["seeds"] == [0, 1]
    for seed, policy, top1 in zip((0, 1), saved["policies"], members[family]):
      # Seed s's search gave policy_s, fine-tuned with seed s.
      assert (cell / family / f"seed_{seed}" / "search.json").exists()
      key = f"w{'-'.join(map(str, policy['w_bits']))}_a{'-'.join(map(str, policy['a_bits']))}"
      result = json.loads((root / "policies" / key / f"seed_{seed}" / "results.json")
                          .read_text())
      assert result["seed"] == seed and result["test_top1"] == pytest.approx(top1)
  assert (root / "compare_bismo-edge.png").read_bytes().startswith(lt.PNG_SIGNATURE)
  assert "| bismo-edge | latency | w4a4 | hawq |" in (root / "compare.md").read_text()
  # A rerun reads every finished row back: nothing is searched or trained again.
  written = {p: os.stat(p).st_mtime_ns
             for p in glob.glob(str(root / "**" / "*.json"), recursive=True)}
  csv_text = (root / "compare.csv").read_text()
  grid = compare.check_grid("digits", ["bismo-edge"], ["latency"], ["w4a4"],
                            ["greedy", "hawq", "uniform_max", "hawq_tensor"], "minmax", 2,
                            quick=True,
                            init_from=_flag(flags, "init_from").split("=", 1)[1])
  again = compare.run(grid, str(folder))  # In this process: only reads.
  assert [l["members"] for l in again["lines"]] == list(members.values())
  assert {p: os.stat(p).st_mtime_ns
          for p in glob.glob(str(root / "**" / "*.json"), recursive=True)} == written
  assert (root / "compare.csv").read_text() == csv_text


def test_a_diverged_fine_tune_is_recorded_and_its_row_reported(tmp_path_factory,
                                                              monkeypatch):
  import jax
  import numpy as np
  from haqjax.train import members
  flags, folder = lt.digits_fp32(tmp_path_factory, "compare_diverged")
  fit = members.fit_members

  def seed_1_from_nan(config, model, splits, states, policies, seeds, workdir, **kw):
    k = list(seeds).index(1)
    states = states.replace(params=jax.tree.map(lambda x: x.at[k].set(np.nan),
                                                states.params))
    return fit(config, model, splits, states, policies, seeds, workdir, **kw)

  monkeypatch.setattr(members, "fit_members", seed_1_from_nan)
  grid = compare.check_grid("digits", ["bismo-edge"], ["latency"], ["w4a4"], ["uniform"],
                            "minmax", 2, quick=True,
                            init_from=_flag(flags, "init_from").split("=", 1)[1],
                            data_dir=_flag(flags, "data_dir").split("=", 1)[1])
  out = compare.run(grid, str(folder))
  (line,) = out["lines"]
  assert line["members"][1] is None and line["diverged"] == 1
  assert line["top1_mean"] == line["members"][0] and line["top1_std"] is None
  root = folder / "digits_minmax_quick"
  row = json.loads((root / "cells" / "bismo-edge" / "latency" / "w4a4" / "rows"
                    / "uniform.json").read_text())
  assert row["diverged"][0] is None
  assert row["diverged"][1].startswith("member 1 (seed 1): training diverged: ")
  key = next(p.name for p in (root / "policies").iterdir())
  result = json.loads((root / "policies" / key / "seed_1" / "results.json").read_text())
  assert result["test_top1"] is None and result["diverged"] == row["diverged"][1]
  assert "| 1 |" in (root / "compare.md").read_text()
  # A rerun keeps the diverged member's record: nothing is trained again.
  monkeypatch.setattr(members, "fit_members", fit)
  assert compare.run(grid, str(folder))["lines"][0]["members"] == line["members"]


@pytest.mark.parametrize("target, batch, metric, budget, widest", [
    ("bismo-edge", 1, "latency", "w4a4", (4, 4)),
    ("bitfusion", 16, "latency", "w4a4", (4, 4)),
    # At batch 1 the quickstart's small layers leave Bit Fusion's fused array
    # as idle at 2 bits as at 3 or 5, and its DRAM tiles at 2 bits read more:
    # W2A3, W2A4, W2A5 and W3A3 all cost less than W2A2.
    ("bitfusion", 1, "latency", "w2a2", (2, 5)),
    # The preset systolic array computes in 8 bits: only W8A8 stalls on DRAM
    # (6 cycles in one layer), so W8A7 has W2A2's latency.
    ("systolic", 1, "latency", "w2a2", (8, 7)),
    ("systolic", 1, "energy", "w4a4", (4, 4)),
    # A crossbar senses each column once per input bit: weight bits are free.
    ("cim", 1, "latency", "w4a4", (8, 4)),
    ("cim", 1, "energy", "w2a2", (2, 2)),
    # A size budget counts no activation bits.
    ("bismo-edge", 1, "size", "w3a3", (3, 8)),
])
def test_widest_fitting_uniform_policy(target, batch, metric, budget, widest):
  from haqjax import hardware
  from haqjax import models
  from haqjax.jobs import uniform
  from haqjax.nn import layer_table
  from haqjax.search import env
  table = layer_table(models.create("quickstart_cnn", num_classes=10), (1, 28, 28, 1))
  layers = hardware.from_layer_table(table, batch=batch)
  wall = env.BudgetWall(hardware.get_target(target), layers,
                        hardware.Budget(metric=metric, value=1.0, reference=budget),
                        min_bits=2, max_bits=8,
                        fixed=env.Fixed.create(len(table), mode="linear"))
  floor = uniform.bits_of(budget)
  policy = uniform.widest_fitting(wall, table.names, floor)
  n = len(table)
  assert (list(policy.w_bits), list(policy.a_bits)) == ([widest[0]] * n, [widest[1]] * n)
  assert wall.fits(policy.w_bits, policy.a_bits)
  # No uniform policy above the floor with more bits in all fits.
  for w in range(floor[0], 9):
    for a in range(floor[1], 9):
      if w + a > sum(widest):
        assert not wall.fits([w] * n, [a] * n), (w, a)
  if not wall.fits([8] * n, [8] * n):
    with pytest.raises(ValueError, match="no uniform policy of at least W8A8 fits"):
      uniform.widest_fitting(wall, table.names, (8, 8))


def test_rl_executed_variant_changes_only_its_agent_settings():
  from experiments import families
  from experiments import recipes
  from haqjax.search.config import SearchConfig
  from haqjax.train.config import Config
  config, search = recipes.read_configs("quickstart_rl_executed", (Config, SearchConfig))
  base_config, base = recipes.read_configs("quickstart_rl", (Config, SearchConfig))
  assert config == base_config and search.replace(ddpg=base.ddpg) == base
  assert (search.ddpg.replay_actions, search.ddpg.delta_decay) == ("executed", 0.96)
  # A plan's own change (QUICK's warm-up) stays; the variant's two settings come in.
  quick = base.ddpg.replace(warmup_episodes=3)
  got = families.variant_ddpg(quick, families.VARIANTS["rl_executed"][1])
  assert got == quick.replace(replay_actions="executed", delta_decay=0.96)
  grid = compare.check_grid("digits", ["cim"], ["latency"], ["w4a4"],
                            ["rl_executed", "uniform_max"], "minmax", 1)
  assert grid.families == ("uniform", "rl_executed", "uniform_max")


def test_rl_saving_variant_is_rl_executed_with_the_saving_wall():
  from experiments import families
  from experiments import recipes
  from haqjax.search.config import SearchConfig
  from haqjax.train.config import Config
  config, search = recipes.read_configs("quickstart_rl_saving", (Config, SearchConfig))
  executed_config, executed = recipes.read_configs("quickstart_rl_executed",
                                                   (Config, SearchConfig))
  assert config == executed_config and search == executed.replace(wall_order="saving")
  base = recipes.read_configs("quickstart_rl", (Config, SearchConfig))[1]
  quick = base.replace(ddpg=base.ddpg.replace(warmup_episodes=3), target="cim")
  got = families.variant_search(quick, families.VARIANTS["rl_saving"][1])
  assert got == quick.replace(ddpg=quick.ddpg.replace(replay_actions="executed",
                                                      delta_decay=0.96),
                              wall_order="saving")


@pytest.mark.parametrize("recipe", ["fashion_mobilenet_v2", "quickstart"])
def test_frozen_bn_recipe_fine_tunes_on_frozen_statistics_and_trains_the_same(recipe):
  from experiments import recipes
  from haqjax.train.config import Config
  plan = families.Plan()
  base = families.configs("minmax", "w4a4", plan, "/fp32", None,
                          recipe=recipe, target="bitfusion")
  frozen = families.configs("minmax", "w4a4", plan, "/fp32", None,
                            recipe=f"{recipe}_frozen_bn", target="bitfusion")
  assert frozen[0].freeze_bn_stats and not base[0].freeze_bn_stats
  assert frozen[0].replace(freeze_bn_stats=False) == base[0] and frozen[1:] == base[1:]
  (trained,) = recipes.read_configs(recipe, (Config,))
  (trained_frozen,) = recipes.read_configs(f"{recipe}_frozen_bn", (Config,))
  assert trained_frozen == trained.replace(freeze_bn_stats=True)  # Used by QAT only.


def test_gumbel_absolute_variant_changes_only_its_penalty():
  from experiments import recipes
  from haqjax.search.config import SearchConfig
  from haqjax.search.gumbel import GumbelConfig
  from haqjax.train.config import Config
  types = (Config, SearchConfig, GumbelConfig)
  config, search, gumbel = recipes.read_configs("quickstart_sweep_absolute", types)
  base_config, base_search, base = recipes.read_configs("quickstart_sweep", types)
  assert (config, search) == (base_config, base_search)
  assert gumbel == base.replace(gumbel_penalty="absolute", gumbel_lambda=1.0)
  # A plan's own change (QUICK's search length) stays.
  quick = base.replace(gumbel_epochs=0.05, gumbel_warmup_epochs=0.01)
  got = families.variant_gumbel(quick, families.VARIANTS["gumbel_absolute"][1])
  assert got == quick.replace(gumbel_penalty="absolute", gumbel_lambda=1.0)
  assert families.stamp_of("gumbel_absolute", got) == {
      "gumbel_derive": "map", "gumbel_quantizers": "per_candidate"}


def test_gumbel_shared_variant_shares_the_quantizers_and_its_own_folder():
  from experiments import recipes
  from haqjax.search.config import SearchConfig
  from haqjax.search.gumbel import GumbelConfig
  from haqjax.train.config import Config
  types = (Config, SearchConfig, GumbelConfig)
  config, search, gumbel = recipes.read_configs("quickstart_sweep_shared", types)
  base_config, base_search, base = recipes.read_configs("quickstart_sweep", types)
  assert (config, search) == (base_config, base_search)
  assert gumbel == base.replace(gumbel_quantizers="shared")
  assert families.stamp_of("gumbel_shared", base) == {
      "gumbel_derive": base.gumbel_derive, "gumbel_quantizers": "shared"}
  # Records from before the field existed searched with shared quantizers.
  assert families.stamped({"gumbel_derive": "map"}, families.stamp_of("gumbel_shared", base))
  assert not families.stamped({"gumbel_derive": "map"}, families.stamp_of("gumbel", base))
  assert families.search_folder("gumbel_search", gumbel) == "gumbel_search"
  assert families.search_folder("gumbel_search", base) == "gumbel_search_per_candidate"


def test_summary_has_a_row_per_budget_and_marks_intervals():
  def row(family, members, budget="w4a4", bits=None):
    r = _row(family, members, budget)
    if bits:
      r["policies"] = [{"w_bits": [8, *bits[0], 8], "a_bits": [8, *bits[1], 8]}] * 2
    return r
  lines = comparison.table([
      row("uniform", [60.0, 62.0]), row("uniform_max", [63.0, 65.0], bits=([8, 8], [4, 4])),
      row("hawq", [59.0, 59.5]), row("uniform", [50.0, 50.0], "w3a3"),
      row("uniform_max", [50.0, 50.0], "w3a3", bits=([3, 3], [3, 3])),
      row("rl", [49.0, 52.0], "w3a3")])
  text = comparison.summary(lines, "t").splitlines()
  assert text[2] == "| target | metric | budget | uniform | uniform_max | hawq | rl |"
  # uniform_max's differences 3 and 3: an interval above zero (bold), named by
  # its middle layers' bits; hawq's -1 and -2.5 with t_{0.975,1} = 12.7: no mark.
  assert text[4] == ("| t | latency | w4a4 | 61.00 ± 1.41 | **W8A4 64.00 ± 1.41 "
                     "(+3.00 [+3.00, +3.00])** | 59.25 ± 0.35 (-1.75 [-11.28, +7.78]) |  |")
  # The budget's own bits are not named; a family a budget lacks is empty.
  assert text[5] == ("| t | latency | w3a3 | 50.00 ± 0.00 | 50.00 ± 0.00 "
                     "(+0.00 [+0.00, +0.00]) |  | 50.50 ± 2.12 (+0.50 [-18.56, +19.56]) |")
  # A policy whose ends hold bits no convention fixes is not a uniform one.
  mixed = {**_row("gumbel", [63.0, 65.0]),
           "policies": [{"w_bits": [6, 2, 2, 3], "a_bits": [8, 8, 8, 8]}] * 2}
  line = comparison.table([row("uniform", [60.0, 62.0]), mixed])[1]
  assert "| **64.00 ± 1.41 (+3.00" in comparison.summary([line])
  below = comparison.summary(comparison.table(
      [row("uniform", [60.0, 62.0, 61.0]), row("rl", [58.0, 60.1, 58.9])]))
  assert "_59.00 ± 1.05 (-2.00 [-2.25, -1.75])_" in below


def test_a_diverged_member_leaves_its_pair_and_is_counted(tmp_path):
  lines = comparison.table([
      _row("uniform", [60.0, 62.0, 61.0]), _row("hawq", [64.0, None, 66.0]),
      _row("rl", [None, None, None]), _row("greedy", [61.0, 63.0, None])])
  hawq, rl, greedy = lines[1:]
  # hawq: mean and std of 64 and 66; differences 4 and 5 (seeds 0 and 2).
  assert hawq["diverged"] == 1 and hawq["top1_mean"] == 65.0
  assert hawq["top1_std"] == pytest.approx(math.sqrt(2))
  assert hawq["diff_mean"] == 4.5
  assert hawq["ci_high"] - 4.5 == pytest.approx(12.7062 * 0.5, abs=1e-4)
  assert rl["diverged"] == 3 and rl["top1_mean"] is None and rl["diff_mean"] is None
  assert greedy["diff_mean"] == 1.0 and greedy["diverged"] == 1
  # A diverged reference member drops the pair too.
  ref = comparison.table([_row("uniform", [60.0, None]), _row("hawq", [61.0, 70.0])])
  assert ref[1]["diff_mean"] == 1.0 and ref[1]["ci_low"] is None
  text = comparison.summary(lines).splitlines()
  assert text[2].split(" | ")[4:] == ["65.00 ± 1.41, 1 of 3 diverged (+4.50 [-1.85, +10.85])",
                                     "diverged (3 of 3)",
                                     "**62.00 ± 1.41, 1 of 3 diverged (+1.00 [+1.00, +1.00])** |"]
  markdown = comparison.markdown(lines)
  assert "| 64.00 diverged 66.00 | 1 |" in markdown
  with open(comparison.write_csv(str(tmp_path / "c.csv"), lines)) as f:
    rows = list(csv.DictReader(f))
  assert rows[2]["members"] == "nan nan nan" and rows[2]["diverged"] == "3"
  comparison.plot_target(str(tmp_path / "t.png"), lines, "t")
  with pytest.raises(ValueError, match="hawq has 1 members and uniform 2"):
    comparison.table([_row("uniform", [1.0, 2.0]), _row("hawq", [1.0])])


def test_table_pairs_with_another_reference_where_the_budget_has_it():
  rows = [_row("uniform", [60.0, 62.0]), _row("uniform_max", [63.0, 64.0]),
          _row("hawq", [64.0, 66.0]), _row("uniform", [50.0, 50.0], "w3a3"),
          _row("rl", [51.0, 52.0], "w3a3")]
  lines = comparison.table(rows, reference="uniform_max")
  # W4A4: every row against uniform_max (uniform too); W3A3 has none: uniform.
  assert [l["diff_mean"] for l in lines] == [-2.5, None, 1.5, None, 1.5]
  assert [l["diff_mean"] for l in comparison.table(rows)] == [None, 2.5, 4.0, None, 1.5]
  # A row of the reference's own policies is not paired with it.
  same = [{**r, "policies": [{"w_bits": [4], "a_bits": [4]}]} for r in rows[:2]]
  assert [l["diff_mean"] for l in comparison.table(same)] == [None, None]


def test_cached_searches_with_another_gumbel_derivation_are_derived_again(tmp_path):
  from haqjax.search.gumbel import GumbelConfig
  from haqjax.search.hawq import HawqConfig
  path = str(tmp_path / "search.json")
  stamp = families.stamp_of("gumbel", GumbelConfig(gumbel_quantizers="shared"))
  assert stamp == {"gumbel_derive": "map", "gumbel_quantizers": "shared"}
  assert families.stamp_of("hawq", GumbelConfig()) == {}
  calls = []

  def compute(bits):
    calls.append(bits)
    return {"w_bits": [bits], "a_bits": [bits], "seconds": 0.5, **stamp}

  # A record from before the derivation was recorded: the wall's, so derived again,
  # keeping the search's seconds.
  with open(path, "w") as f:
    json.dump({"w_bits": [2], "a_bits": [2], "seconds": 30.0}, f)
  done = families.cached(path, lambda: compute(4), stamp)
  assert calls == [4] and done["w_bits"] == [4] and done["seconds"] == 30.0
  assert json.loads(open(path).read()) == done
  # A matching record is read back.
  assert families.cached(path, lambda: compute(8), stamp) == done and calls == [4]
  # HAWQ's and greedy's records carry their pass's granularity; one written
  # before it was recorded is per tensor.
  hawq = HawqConfig()
  assert families.stamp_of("greedy", GumbelConfig(), hawq) == {"hawq_granularity": "channel"}
  tensor = families.stamp_of("hawq_tensor", GumbelConfig(), hawq)
  assert tensor == {"hawq_granularity": "tensor"}
  assert families.stamped({"seconds": 1.0}, tensor)
  assert not families.stamped({"seconds": 1.0}, families.stamp_of("hawq", GumbelConfig(), hawq))
  # Without a stamp (other families) any record is read back.
  assert families.cached(path, lambda: compute(8)) == done and calls == [4]
  assert not families.stamped({"seconds": 1.0}, stamp)
  assert families.stamped({"seconds": 1.0}, families.stamp_of("gumbel", GumbelConfig(
      gumbel_derive="wall", gumbel_quantizers="shared")))
  # Other quantizers: a new search, which counts its own seconds.
  own = families.stamp_of("gumbel", GumbelConfig())
  assert own["gumbel_quantizers"] == "per_candidate"
  renewed = families.cached(path, lambda: {**compute(6), **own}, own)
  assert calls == [4, 6] and renewed["seconds"] == 0.5 and renewed["w_bits"] == [6]
