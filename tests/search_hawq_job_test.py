"""The HAWQ job end to end on digits: sensitivities, allocation, fine-tune."""

import json

import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.jobs import hawq as hawq_job
from haqjax.nn import layer_table
from haqjax.policy import load_policy
from haqjax.search.config import SearchConfig
from haqjax.search.hawq import HawqConfig
from haqjax.search.hawq import read_sensitivity
from haqjax.train.config import Config


def _configs(tmp, **hawq):
  config = Config(dataset="digits", data_dir=str(tmp / "data"), val_size=200,
                  model="digits_cnn", epochs=2, batch_size=64, eval_batch_size=200,
                  learning_rate=0.05, weight_decay=1e-4, first_layer_w8=True,
                  progress=False, tensorboard=False)
  search = SearchConfig(budget=0.85, finetune_epochs=0.25, finetune_uniform_reference=False)
  return config, search, HawqConfig(hawq_probes=4, hawq_max_iterations=6, hawq_batches=2,
                                    **hawq)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("hawq")
  config, search, hawq = _configs(tmp)
  workdir = tmp / "job"
  results = hawq_job.search_and_evaluate(config, search, hawq, str(workdir), "cmd")
  return tmp, workdir, results


def test_policy_is_the_ilp_allocation_within_budget(run):
  _, workdir, results = run
  table = layer_table(models.create("digits_cnn", num_classes=10), (1, 8, 8, 1))
  policy = load_policy(workdir / "policy.json", table.names)
  d = json.loads((workdir / "policy.json").read_text())
  assert d["cost"] <= d["budget"]["limit"] * (1 + 1e-9) and d["cost_ratio"] <= 0.85 + 1e-9
  assert d["search"]["algorithm"] == "hawq" and d["search"]["allocator"] == "ilp"
  assert (d["layers"][0]["w_bits"], d["layers"][0]["a_bits"]) == (8, 32)
  cost = hardware.policy_cost(hardware.get_target("bismo-edge"),
                              hardware.from_layer_table(table),
                              np.asarray(policy.w_bits), np.asarray(policy.a_bits))
  np.testing.assert_allclose(d["cost"], float(cost), rtol=1e-5)
  assert results["mode"] == "hawq" and results["fits"] and 0 <= results["test_top1"] <= 100
  # The ILP is no worse than any point of its own Pareto front that fits.
  fitting = [p["omega"] for p in results["pareto"] if p["cost"] <= d["budget"]["limit"]]
  assert fitting and results["omega"] <= min(fitting) * (1 + 1e-9)


def test_sensitivity_file_and_results(run):
  _, workdir, results = run
  s = read_sensitivity(workdir / "sensitivity.json")
  assert s.names == ("stem", "conv1", "classifier")
  assert s.omega.shape == (3, 9, 9) and 2 <= s.traces.iterations <= 6
  assert s.w_bits == tuple(range(2, 9)) and s.a_bits == tuple(range(2, 9))
  r = json.loads((workdir / "results.json").read_text())
  assert r["command"] == "cmd" and r["weight_traces"] == s.traces.weight.tolist()
  assert r["sensitivity_seconds"] > 0 and r["allocation_seconds"] > 0
  assert (workdir / "plots" / "bits.png").exists()
  report = (workdir / "report.md").read_text()
  assert report.startswith("# HAWQ allocation:") and "allocation, total perturbation" in report
  pareto = r["pareto"]
  assert len(pareto) == hawq_job.PARETO_POINTS
  assert all(a["omega"] >= b["omega"] - 1e-12 for a, b in zip(pareto, pareto[1:]))


def test_rerun_reads_the_sensitivities_back(run):
  tmp, workdir, results = run
  before = (workdir / "sensitivity.json").stat().st_mtime_ns
  config, search, hawq = _configs(tmp)
  again = hawq_job.search_and_evaluate(config, search, hawq, str(workdir), "cmd")
  assert (workdir / "sensitivity.json").stat().st_mtime_ns == before
  assert again["policy"] == results["policy"] and again["test_top1"] == results["test_top1"]
  with pytest.raises(ValueError, match="hawq_allocator"):
    hawq_job.search_and_evaluate(config, search, hawq.replace(hawq_allocator="greedy"),
                                 str(workdir), "cmd")


def test_bad_settings_fail_before_training(tmp_path):
  config, search, hawq = _configs(tmp_path)
  with pytest.raises(ValueError, match=r"hawq_batches=99 needs 99 batches of 64"):
    hawq_job.search_and_evaluate(config, search, hawq.replace(hawq_batches=99),
                                 str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"hawq_bits='1,4'; allowed: .* in 2..8, e.g. 4,8"):
    hawq_job.search_and_evaluate(config, search, hawq.replace(hawq_bits="1,4"),
                                 str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  with pytest.raises(ValueError, match="hawq_allocator='lp' is not allowed"):
    HawqConfig(hawq_allocator="lp")
  with pytest.raises(ValueError, match=r"hawq_bits='4,9'; allowed: .* in 1..8"):
    HawqConfig(hawq_bits="4,9")
  with pytest.raises(ValueError, match=r"hawq_probes=0; allowed: an integer >= 1"):
    HawqConfig(hawq_probes=0)
