"""The PTQ flow end to end on a trained digits model, and the launcher's ptq mode."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import recipes
from haqjax import data as haq_data
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.ptq import pipeline
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import trainer
from launcher_testing import assert_one_line_error
from launcher_testing import launch
from launcher_testing import launch_many


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("ptq")
  config = recipes.load_recipe("digits", epochs=8, progress=False, tensorboard=False,
                               data_dir=str(root / "data"))
  fp32 = trainer.train_and_evaluate(config, str(root / "fp32"))
  splits = haq_data.load("digits", data_dir=str(root / "data"), val_size=200)
  model = trainer.build_model(config, 10)
  variables = jax.tree.map(jnp.asarray, ckpt_lib.restore_variables(str(root / "fp32")))
  batches = [{"image": jnp.asarray(b["image"])} for b in haq_data.batches(
      splits.train, batch_size=128, seed=0, epoch=0, shuffle=True, drop_remainder=True)][:4]
  names = layer_table(model, (1, 8, 8, 1)).names
  return root, config, fp32, splits, model, variables, batches, names


def _accuracy(model, variables, split, policy):
  return trainer.Evaluator(model, None, 200)(variables, split, policy)["top1"]


def test_w8a8_ptq_keeps_fp32_accuracy_and_each_step_reports(trained):
  _, _, fp32, splits, model, variables, batches, names = trained
  policy = Policy.uniform(names, 8, 8)
  result = pipeline.ptq(jax.random.key(0), model, variables, batches, policy,
                        pipeline.PTQOptions(adaround_iters=200))
  acc = _accuracy(result.model, result.variables, splits.test, policy)
  assert acc >= fp32["test_top1"] - 1.0, (acc, fp32["test_top1"])
  assert set(result.report["seconds"]) == {"fold_bn", "cle", "high_bias_absorption",
                                           "record_inputs", "weight_range", "adaround",
                                           "act_range"}
  stem = result.variables["params"]["stem"]
  # AdaRound's kernels sit on the grid of the stored weight range.
  requant = result.model.apply(result.variables, batches[0]["image"], policy=policy)
  assert np.all(np.isfinite(requant))
  lo, hi = stem["weight_quant"]["lo"], stem["weight_quant"]["hi"]
  scale = np.maximum(np.abs(lo), np.abs(hi)) / 127.5  # max|w| / ((qmax - qmin) / 2)
  codes = np.asarray(stem["kernel"]) / scale
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
  assert codes.min() >= -128 - 1e-3 and codes.max() <= 127 + 1e-3


def test_adaround_beats_nearest_at_low_weight_bits(trained):
  _, _, _, splits, model, variables, batches, names = trained
  policy = Policy.uniform(names, 3, 8)
  nearest = pipeline.ptq(jax.random.key(0), model, variables, batches, policy,
                         pipeline.PTQOptions(adaround=False, bias_correction="none",
                                             weight_range="minmax"))
  ada = pipeline.ptq(jax.random.key(0), model, variables, batches, policy,
                     pipeline.PTQOptions(adaround_iters=500, weight_range="minmax"))
  acc_nearest = _accuracy(nearest.model, nearest.variables, splits.val, policy)
  acc_ada = _accuracy(ada.model, ada.variables, splits.val, policy)
  assert acc_ada >= acc_nearest, (acc_ada, acc_nearest)


def test_scorer_ranks_policies_with_one_compiled_eval(trained):
  _, _, fp32, splits, model, variables, batches, names = trained
  scorer = pipeline.PTQScorer(model, variables, batches, splits.val, eval_batch_size=200)
  original = scorer._evaluate._step  # pylint: disable=protected-access
  scores = {}
  for w, a in ((8, 8), (6, 6), (4, 8), (2, 2)):
    scores[(w, a)] = scorer(Policy.uniform(names, w, a))["top1"]
  assert scorer._evaluate._step is original  # pylint: disable=protected-access
  assert original._cache_size() == 1  # pylint: disable=protected-access
  assert scores[(8, 8)] >= fp32["val_top1"] - 1.0
  assert scores[(2, 2)] < scores[(8, 8)] - 5


def test_options_are_validated():
  with pytest.raises(ValueError, match="act_range is 'max'; allowed: minmax"):
    pipeline.PTQOptions(act_range="max")
  with pytest.raises(ValueError, match="cle is True with fold_bn False"):
    pipeline.PTQOptions(fold_bn=False)
  with pytest.raises(ValueError, match="adaround_iters is 0"):
    pipeline.PTQOptions(adaround_iters=0)


def test_bad_calibration_data(trained):
  _, _, _, _, model, variables, batches, names = trained
  policy = Policy.uniform(names, 8, 8)
  with pytest.raises(ValueError, match="calibration batches are empty"):
    pipeline.ptq(jax.random.key(0), model, variables, [], policy)
  bad = [{"image": batches[0]["image"].at[0, 0, 0, 0].set(jnp.nan)}]
  with pytest.raises(ValueError, match="non-finite"):
    pipeline.ptq(jax.random.key(0), model, variables, bad, policy)


def test_launcher_ptq_mode_and_its_errors(trained):
  root = trained[0]
  args = ["--flagfile=experiments/flags/digits.flags", f"--data_dir={root / 'data'}",
          "--compilation_cache=", "--noprogress", "--mode=ptq", "--policy=w4a8",
          f"--init_from={root / 'fp32'}", "--adaround_iters=100",
          "--calibration_size=256"]
  # The export stage has its own tests (jobs_export_test.py).
  proc = launch(*args, "--noexport", f"--workdir={root / 'ptq'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["mode"] == "ptq" and summary["test_top1"] > 50
  report = json.loads((root / "ptq" / "ptq.json").read_text())
  assert report["calibration_images"] == 256
  assert os.path.exists(root / "ptq" / "policy.json")
  assert not os.path.exists(root / "ptq" / "export")
  procs = launch_many([
      [*args[:-1], "--calibration_size=100000", f"--workdir={root / 'ptq2'}"],
      [*args[:-1], "--calibration_size=32", f"--workdir={root / 'ptq5'}"],
      [*args[:6], f"--workdir={root / 'ptq3'}"],  # No --init_from.
      [*args, "--policy=w4a9", f"--workdir={root / 'ptq4'}"],
  ])
  assert_one_line_error(procs[0], "calibration_size=100000", "training split has")
  assert_one_line_error(procs[1], "calibration_size=32 is smaller than one batch")
  assert_one_line_error(procs[2], "init_from is empty")
  assert_one_line_error(procs[3], "a bits 9 is outside 1..8")
