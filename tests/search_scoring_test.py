"""Tests of the episode scorers: one compile for every policy, reproducible scores."""

import numpy as np
import pytest

from experiments import recipes
from haqjax import data as haq_data
from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.search import scoring
from haqjax.jobs import rl as rl_job
from haqjax.search.config import SearchConfig
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import trainer


@pytest.fixture(scope="module", autouse=True)
def fresh_calibrators():
  """This module counts its own calibration traces: equal models share a
  `Calibrator`, so one traced by another test module in the same process
  (on other batch shapes) would add to the count."""
  calibrate_lib.clear_calibrators()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A digits FP32 run, its splits and the search's config."""
  tmp = tmp_path_factory.mktemp("scoring")
  fp32_dir = str(tmp / "fp32")
  overrides = {"data_dir": str(tmp / "data"), "progress": False, "tensorboard": False}
  trainer.train_and_evaluate(recipes.load_recipe("digits", epochs=2, **overrides), fp32_dir)
  config = recipes.load_recipe("digits", mode="rl", **overrides)
  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         val_size=config.val_size, split_seed=config.split_seed)
  model = trainer.build_model(config.replace(mode="train"), splits.spec.num_classes)
  names = layer_table(model, (1, *splits.spec.image_shape)).names
  return config, splits, fp32_dir, names


def _policies(names):
  rng = np.random.RandomState(0)
  n = len(names)
  return {"w8a8": Policy.uniform(names, 8, 8), "w2a2": Policy.uniform(names, 2, 2),
          "w4a6": Policy.uniform(names, 4, 6),
          "mixed": Policy.create(names, rng.randint(2, 9, n), rng.randint(2, 9, n))}


# The default static activation ranges are calibrated for every policy: their
# recording traces once, and so does their fit (sign 'auto': both grids'
# ranges, the data's picked inside the program).
STATIC_CALIBRATION = {"calibration_record": 1, "calibration_calibrate": 1}


@pytest.fixture(scope="module")
def qat_scorer(setup):
  config, splits, fp32_dir, _ = setup
  search = SearchConfig(search_finetune_steps=4, search_val_size=150)
  scorer = rl_job.make_scorer(config, search, splits, fp32_dir)
  assert isinstance(scorer, scoring.QATScorer)
  return scorer


@pytest.fixture(scope="module")
def qat_scores(setup, qat_scorer):
  """Each policy scored in turn, then the first one again."""
  policies = _policies(setup[3])
  scores = [(name, qat_scorer(p)) for name, p in policies.items()]
  scores.append(("w8a8", qat_scorer(policies["w8a8"])))
  return scores


def test_qat_scorer_traces_each_step_once(qat_scorer, qat_scores):
  assert len({name for name, _ in qat_scores}) >= 4
  assert qat_scorer.trace_counts() == {"train": 1, "eval": 1, **STATIC_CALIBRATION}


def test_qat_scorer_scores(qat_scores):
  for name, s in qat_scores:
    assert set(s) >= {"top1", "top5", "loss", "seconds"}, name
    assert 0.0 <= s["top1"] <= 100.0 and s["top1"] <= s["top5"] <= 100.0, name
    assert np.isfinite(s["loss"]) and s["seconds"] > 0, name
  by_name = dict(qat_scores[:-1])
  # The policy matters: 2-bit everywhere loses to 8-bit everywhere.
  assert by_name["w2a2"]["loss"] > by_name["w8a8"]["loss"]
  assert len({s["loss"] for s in by_name.values()}) == len(by_name)


def test_qat_scorer_restarts_from_fp32_each_call(qat_scorer, qat_scores, setup):
  # w8a8 first, three other policies, w8a8 again: identical scores.
  first, last = qat_scores[0][1], qat_scores[-1][1]
  for key in ("top1", "top5", "loss"):
    assert first[key] == last[key], key
  # And right away, twice in a row.
  policy = _policies(setup[3])["mixed"]
  again = qat_scorer(policy)
  assert again["top1"] == dict(qat_scores)["mixed"]["top1"]
  assert again["loss"] == dict(qat_scores)["mixed"]["loss"]
  assert qat_scorer.trace_counts() == {"train": 1, "eval": 1, **STATIC_CALIBRATION}


def test_qat_scorer_scores_at_several_lengths_in_one_fine_tune(qat_scorer, qat_scores,
                                                               setup):
  """`scores` reads the reward at shorter fine-tunes along the way: its last
  entry is `__call__`'s figure, its first (no step) the calibrated model's."""
  policy = _policies(setup[3])["mixed"]
  at = qat_scorer.scores(policy, (4, 0, 2))
  assert list(at) == [0, 2, 4]
  assert at[4]["top1"] == dict(qat_scores)["mixed"]["top1"]
  assert at[4]["loss"] == dict(qat_scores)["mixed"]["loss"]
  assert at[0]["loss"] != at[2]["loss"] != at[4]["loss"]
  assert at[0]["seconds"] <= at[2]["seconds"] <= at[4]["seconds"]
  assert qat_scorer.trace_counts() == {"train": 1, "eval": 1, **STATIC_CALIBRATION}
  with pytest.raises(ValueError, match=r"^at_steps=\[2, 5\]; allowed: 0..4 "):
    qat_scorer.scores(policy, (5, 2))


def test_qat_scorer_without_steps_only_evaluates(setup):
  config, splits, fp32_dir, names = setup
  scorer = rl_job.make_scorer(config, SearchConfig(search_finetune_steps=0,
                                                   search_val_size=150),
                              splits, fp32_dir)
  s = scorer(Policy.uniform(names, 8, 8))
  assert 0.0 <= s["top1"] <= 100.0
  assert scorer.trace_counts() == {"train": 0, "eval": 1, **STATIC_CALIBRATION}


def _direct_scorer(setup, num_steps):
  config, splits, fp32_dir, _ = setup
  model = trainer.build_model(config.replace(mode="qat", policy="w8a8"),
                              splits.spec.num_classes)
  return scoring.QATScorer(model, ckpt_lib.restore_variables(fp32_dir), splits.train,
                           splits.val, num_steps=num_steps, batch_size=config.batch_size,
                           learning_rate=0.01)


def test_qat_scorer_calibrates_once_for_every_policy(setup):
  """LSQ weights are calibrated per policy; the calibration compiles once."""
  config, splits, fp32_dir, names = setup
  model = trainer.build_model(config.replace(mode="qat", policy="w8a8",
                                             weight_quantizer="lsq", act_quantizer="lsq"),
                              splits.spec.num_classes)
  scorer = scoring.QATScorer(model, ckpt_lib.restore_variables(fp32_dir), splits.train,
                             scoring.subset(splits.val, 100), num_steps=1,
                             batch_size=config.batch_size, learning_rate=0.01)
  policies = _policies(names)
  scores = {name: scorer(p) for name, p in policies.items()}
  assert scores["w2a2"]["loss"] != scores["w8a8"]["loss"]
  assert scorer.trace_counts() == {"train": 1, "eval": 1, "calibration_record": 1,
                                   "calibration_calibrate": 1}


@pytest.mark.parametrize("num_steps, msg", [
    (1000, r"^search_finetune_steps=1000 needs 1000 batches of 64; the training split "
           r"has \d+$"),
    (-1, r"^search_finetune_steps=-1; allowed: >= 0$")])
def test_qat_scorer_bad_steps(setup, num_steps, msg):
  with pytest.raises(ValueError, match=msg) as e:
    _direct_scorer(setup, num_steps)
  assert "\n" not in str(e.value)


def test_ptq_scorer_through_make_scorer(setup):
  from haqjax.ptq import pipeline  # pylint: disable=g-import-not-at-top
  config, splits, fp32_dir, names = setup
  config = config.replace(ptq_adaround=False, calibration_size=256)
  search = SearchConfig(search_scorer="ptq", search_val_size=150)
  scorer = rl_job.make_scorer(config, search, splits, fp32_dir)
  assert isinstance(scorer, pipeline.PTQScorer)
  policies = _policies(names)
  scores = {name: scorer(p) for name, p in policies.items()}
  for name, s in scores.items():
    assert 0.0 <= s["top1"] <= 100.0, name
  assert scores["w2a2"]["loss"] > scores["w8a8"]["loss"]
  assert scorer(policies["w8a8"])["top1"] == scores["w8a8"]["top1"]
  assert scorer.trace_counts() == {"eval": 1}
