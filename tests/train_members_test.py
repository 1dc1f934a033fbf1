"""K vmapped fine-tunes (`haqjax.train.members`, `haqjax.train.seeds`) on digits.

Members start from the FP32 model the launcher tests share. A member equals
the standalone run with its seed and policy; one compiled step serves every
set of policies; a K-seed run keeps its finished members across reruns and
exports member 0.
"""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from haqjax import data as haq_data
from haqjax.jobs import seeds as seeds_job
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.policy import save_policy
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import members
from haqjax.train import seeds as seeds_lib
from haqjax.train import trainer
from haqjax.train.config import Config
from launcher_testing import shared_digits

# One test image of digits' 360, in points.
ONE_IMAGE = 100 / 360


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  flags, fp32 = shared_digits(tmp_path_factory)
  data_dir = next(f.split("=", 1)[1] for f in flags if f.startswith("--data_dir="))
  config = Config(mode="qat", dataset="digits", model="digits_cnn", val_size=200,
                  epochs=0.5, batch_size=64, eval_batch_size=200, learning_rate=0.01,
                  weight_decay=1e-4, log_every_steps=5, progress=False, tensorboard=False,
                  data_dir=data_dir, init_from=str(fp32), policy="w4a4")
  splits = haq_data.load("digits", data_dir=data_dir, val_size=200)
  model = trainer.build_model(config, splits.spec.num_classes)
  names = layer_table(model, (1, *splits.spec.image_shape)).names
  uniform = Policy.uniform(names, 4, 4)
  mixed = Policy.create(names, np.resize([8, 2, 3, 4], len(names)),
                        np.resize([8, 3, 2, 4], len(names)))
  return config, model, splits, uniform, mixed, tmp_path_factory.mktemp("members")


def _fit(config, model, splits, policies, seeds, workdir, member_steps=None, poison=(),
         keep_going=False):
  """fit_members from the FP32 model; members in `poison` start from NaN params."""
  steps_per_epoch = haq_data.num_batches(splits.train, config.batch_size, drop_remainder=True)
  _, _, tx = members.schedule_and_optimizer(config, steps_per_epoch)
  member_steps = member_steps or members.MemberSteps(model, tx)
  states = members.init_members(config, model, tx, splits, policies, seeds,
                                ckpt_lib.restore_variables(config.init_from))
  for k in poison:
    states = states.replace(params=jax.tree.map(lambda x: x.at[k].set(np.nan), states.params))
  fitted = members.fit_members(config, model, splits, states, members.stack(policies),
                               seeds, str(workdir), member_steps=member_steps,
                               keep_going=keep_going)
  return fitted, member_steps


@pytest.fixture(scope="module")
def pair(setup):
  """The members (uniform, seed 3) and (mixed, seed 4), fitted once."""
  config, model, splits, uniform, mixed, tmp = setup
  return _fit(config, model, splits, [uniform, mixed], [3, 4], tmp / "pair")


def test_members_equal_standalone_runs_and_share_one_compile(setup, pair):
  config, model, splits, uniform, mixed, tmp = setup
  fitted, member_steps = pair
  # Member 1 (mixed, seed 4) against the standalone run with --seed=4.
  policy_path = str(tmp / "mixed.json")
  save_policy(policy_path, mixed, model=config.model)
  alone = trainer.train_and_evaluate(config.replace(seed=4, policy=policy_path),
                                     str(tmp / "alone"))
  assert fitted["steps"] == alone["steps"]
  mine = members.unstack(fitted["state"].variables(), 1)
  theirs = ckpt_lib.restore_variables(str(tmp / "alone"))
  # The same computation batched: only XLA's reduction order may differ.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               mine, {k: theirs[k] for k in mine})
  assert abs(fitted["test"][1]["top1"] - alone["test_top1"]) <= ONE_IMAGE + 1e-9
  assert abs(fitted["val"][1]["top1"] - alone["val_top1"]) <= 100 / 200 + 1e-9
  # Members differ: their own seeds and policies.
  kernels = [x for p, x in jax.tree_util.tree_flatten_with_path(fitted["state"].params)[0]
             if p[-1].key == "kernel"]
  assert not np.array_equal(kernels[0][0], kernels[0][1])
  assert fitted["traces"] == {"train": 1, "eval": 1}
  # Other policies (and seeds) of the same K: the same compiled steps.
  again, _ = _fit(config.replace(epochs=0.1), model, splits, [mixed, mixed], [5, 6],
                  tmp / "other", member_steps)
  assert again["traces"] == {"train": 1, "eval": 1}


def test_seeds_job_summarises_and_keeps_finished_members(setup):
  config, _, _, _, _, tmp = setup
  config = config.replace(seed=7, epochs=0.25)
  workdir = str(tmp / "seeds")
  results = seeds_lib.train_and_evaluate_seeds(config, workdir, (7, 8))
  tops = results["test_top1_members"]
  assert len(tops) == 2 and results["seeds"] == [7, 8]
  assert results["test_top1"] == pytest.approx(np.mean(tops))
  assert results["test_top1_mean"] == results["test_top1"]
  assert results["test_top1_std"] == pytest.approx(np.std(tops, ddof=1))
  assert results["val_top1_std"] == pytest.approx(np.std(results["val_top1_members"], ddof=1))
  for seed, member in zip((7, 8), results["members"]):
    directory = os.path.join(workdir, member["directory"])
    assert Config.load(os.path.join(directory, "config.json")).seed == seed
    assert ckpt_lib.Checkpointer(directory, create=False).latest_step() == results["steps"]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  # A kill after member 7's results: a rerun trains member 8 only.
  with open(os.path.join(workdir, "seed_7", "results.json")) as f:
    kept = json.load(f)
  shutil.rmtree(os.path.join(workdir, "seed_8"))
  os.remove(os.path.join(workdir, "results.json"))
  rerun = seeds_lib.train_and_evaluate_seeds(config, workdir, (7, 8))
  assert os.path.isdir(os.path.join(workdir, "members_8"))
  with open(os.path.join(workdir, "seed_7", "results.json")) as f:
    assert json.load(f) == kept
  # Member 8 trained alone: the same figures as beside member 7.
  np.testing.assert_allclose(rerun["test_top1_members"], tops, atol=ONE_IMAGE + 1e-9)
  # --export: member 0's integer model; test_top1 stays the members' mean.
  exported = seeds_job.finish_seeds(config, workdir, rerun)
  assert exported["export_member"] == 0 and exported["export_seed"] == 7
  assert exported["export"] == os.path.join("seed_7", "export")
  assert exported["test_top1"] == rerun["test_top1"]
  with open(os.path.join(workdir, "seed_7", "results.json")) as f:
    member = json.load(f)
  assert member["test_top1_fake_quant"] == rerun["test_top1_members"][0]
  assert exported["export_test_top1"] == member["test_top1"]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == exported


def test_seeds_job_drops_a_diverged_member_and_reports_the_rest(setup, monkeypatch):
  from haqjax.report import versus_uniform
  config, _, _, _, _, tmp = setup
  config = config.replace(seed=7, epochs=0.25)
  fit, poisoned = members.fit_members, {7}

  def from_nan(config, model, splits, states, policies, seeds, workdir, **kw):
    for k, seed in enumerate(seeds):
      if seed in poisoned:
        states = states.replace(params=jax.tree.map(lambda x: x.at[k].set(np.nan),
                                                    states.params))
    return fit(config, model, splits, states, policies, seeds, workdir, **kw)

  monkeypatch.setattr(members, "fit_members", from_nan)
  workdir = str(tmp / "seeds_diverged")
  results = seeds_lib.train_and_evaluate_seeds(config, workdir, (7, 8))
  first, second = results["test_top1_members"]
  assert first is None and results["test_top1"] == second
  assert results["test_top1_std"] is None and results["val_top1_members"][0] is None
  assert [d["seed"] for d in results["diverged"]] == [7]
  assert results["diverged"][0]["message"].startswith("member 0 (seed 7): training diverged: ")
  assert results["members"][0]["diverged"] == results["diverged"][0]["message"]
  assert not os.path.isdir(os.path.join(workdir, "seed_7", "checkpoints"))
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "seed_8"),
                               create=False).latest_step() == results["steps"]
  # The first member that did not diverge is the one exported.
  assert seeds_lib.exported_member(results) == 1
  top1 = seeds_job.seeds_top1(results, {"test_top1": second, "test_top1_source": "fake_quant"})
  assert (top1["export_member"], top1["export_seed"]) == (1, 8)
  assert versus_uniform.seeds_pct(results).endswith(f"(2 seeds: diverged, {second:.2f}%)")
  # A rerun reads the dropped member back: nothing is trained again.
  os.remove(os.path.join(workdir, "results.json"))
  monkeypatch.setattr(members, "fit_members", None)
  assert seeds_lib.train_and_evaluate_seeds(config, workdir, (7, 8)) == results
  # Every member diverged: the job stops, naming the first.
  monkeypatch.setattr(members, "fit_members", from_nan)
  poisoned.update({9, 10})
  with pytest.raises(ValueError, match=r"^every member diverged; the first: member 0 "
                                       r"\(seed 9\): training diverged: "):
    seeds_lib.train_and_evaluate_seeds(config.replace(seed=9), str(tmp / "lost"), (9, 10))


def test_seeds_refuses_bad_counts():
  for bad in (0, -1, True):
    with pytest.raises(ValueError, match=r"^--seeds is .*; allowed: a positive integer$"):
      seeds_lib.check_seeds(bad)
  assert seeds_lib.seed_list(5, 3) == (5, 6, 7)


class _Killed(Exception):
  pass


def test_killed_job_resumes_to_the_same_members(setup):
  config, model, splits, uniform, mixed, tmp = setup
  config = config.replace(epochs=0.5, checkpoint_every_steps=4)
  whole, member_steps = _fit(config, model, splits, [uniform, mixed], [1, 2], tmp / "whole")
  train, calls = member_steps.train, []

  def killed_at_step_7(*args):
    calls.append(1)
    if len(calls) == 7:  # After the checkpoint of step 4.
      raise _Killed()
    return train(*args)

  member_steps.train = killed_at_step_7
  with pytest.raises(_Killed):
    _fit(config, model, splits, [uniform, mixed], [1, 2], tmp / "killed", member_steps)
  member_steps.train = train
  resumed, _ = _fit(config, model, splits, [uniform, mixed], [1, 2], tmp / "killed",
                    member_steps)
  assert resumed["steps"] == whole["steps"] and resumed["traces"]["train"] == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               resumed["state"].variables(), whole["state"].variables())
  assert [t["top1"] for t in resumed["test"]] == pytest.approx(
      [t["top1"] for t in whole["test"]], abs=ONE_IMAGE + 1e-9)


def test_a_diverged_member_is_dropped_and_the_others_train_on(setup, pair):
  config, model, splits, uniform, mixed, tmp = setup
  whole, member_steps = pair
  config = config.replace(checkpoint_every_steps=4)
  with pytest.raises(ValueError, match=r"^member 0 \(seed 3\): training diverged: "):
    _fit(config, model, splits, [uniform, mixed], [3, 4], tmp / "stops", member_steps,
         poison=[0])
  fitted, _ = _fit(config, model, splits, [uniform, mixed], [3, 4], tmp / "drops",
                   member_steps, poison=[0], keep_going=True)
  assert list(fitted["diverged"]) == [0]
  assert fitted["diverged"][0].startswith("member 0 (seed 3): training diverged: ")
  assert fitted["test"][0] is None and fitted["val"][0] is None
  assert fitted["steps"] == whole["steps"]
  # Member 1 trained on as it would beside a healthy member 0.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               members.unstack(fitted["state"].variables(), 1),
               members.unstack(whole["state"].variables(), 1))
  assert abs(fitted["test"][1]["top1"] - whole["test"][1]["top1"]) <= ONE_IMAGE + 1e-9
  # The checkpoints record the dropped member: a rerun drops it again.
  again, _ = _fit(config, model, splits, [uniform, mixed], [3, 4], tmp / "drops",
                  member_steps, keep_going=True)
  assert again["diverged"] == fitted["diverged"] and again["test"][0] is None
  assert again["test"][1] == fitted["test"][1]
  # Every member diverged: the job stops early, with nothing to evaluate.
  lost, _ = _fit(config, model, splits, [uniform, mixed], [3, 4], tmp / "lost",
                 member_steps, poison=[0, 1], keep_going=True)
  assert sorted(lost["diverged"]) == [0, 1] and lost["test"] == [None, None]
  assert lost["steps"] < whole["steps"]
  assert member_steps.traces["train"] == 1


def test_a_diverged_member_is_named():
  fetched = [{"loss": np.array([0.5, 0.4]), "grad_norm": np.array([1.0, 2.0])},
             {"loss": np.array([0.5, 0.4]), "grad_norm": np.array([1.0, np.inf])}]
  assert members.diverged_members(fetched[:1], [3, 4], 9, None) == {}
  found = members.diverged_members(fetched, [3, 4], 10, None)
  assert list(found) == [1]
  assert re.match(r"^member 1 \(seed 4\): training diverged: grad_norm is inf at step 10; "
                  r"no checkpoint was written", found[1])
  assert members.diverged_members(fetched, [3, 4], 10, None, skip={1}) == {}
