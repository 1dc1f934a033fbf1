"""End-to-end tests of train_and_evaluate on the digits dataset."""

import json
import os

import jax
import numpy as np
import pytest

from haqjax import data as haq_data
from haqjax import quant
from haqjax.policy import Policy
from haqjax.policy import save_policy
from haqjax.train import Checkpointer
from haqjax.train import Config
from haqjax.train import restore_variables
from haqjax.train import train_and_evaluate
from haqjax.train import trainer


def _config(tmp_root, **changes):
  base = dict(dataset="digits", model="digits_cnn", val_size=200, epochs=10,
              batch_size=64, eval_batch_size=100, learning_rate=0.05,
              weight_decay=1e-4, log_every_steps=5, progress=False,
              data_dir=str(tmp_root / "data"))
  return Config(**{**base, **changes})


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("fp32")
  config = _config(root)
  workdir = str(root / "run")
  return config, workdir, train_and_evaluate(config, workdir)


def test_fp32_training_learns_and_writes_everything(fp32_run):
  config, workdir, results = fp32_run
  assert results["test_top1"] > 85.0, results
  assert results["val_top1"] > 80.0
  for name in ("config.json", "layers.json", "metrics.jsonl", "results.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert Config.load(os.path.join(workdir, "config.json")) == config
  assert json.load(open(os.path.join(workdir, "results.json")))["test_top1"] == results["test_top1"]
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert losses[-1] < losses[0]
  assert any("val/top1" in r for r in records) and any("test/top1" in r for r in records)
  assert Checkpointer(workdir, create=False).latest_step() == results["steps"]


def test_rerun_of_a_finished_run_keeps_results(fp32_run):
  config, workdir, results = fp32_run
  again = train_and_evaluate(config, workdir)
  assert again["steps"] == results["steps"]
  assert again["test_top1"] == pytest.approx(results["test_top1"])


def test_interrupted_run_resumes_to_the_same_result(tmp_path, fp32_run, monkeypatch):
  config, _, results = fp32_run
  config = config.replace(checkpoint_every_steps=7, data_dir=config.data_dir)
  workdir = str(tmp_path / "run")
  real_batches = haq_data.batches
  seen = []

  def interrupting_batches(*args, **kwargs):
    for batch in real_batches(*args, **kwargs):
      seen.append(1)
      if len(seen) == 40:  # Mid-epoch, after a mid-epoch checkpoint.
        raise KeyboardInterrupt
      yield batch

  monkeypatch.setattr(haq_data, "batches", interrupting_batches)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, workdir)
  monkeypatch.setattr(haq_data, "batches", real_batches)
  saved = Checkpointer(workdir, create=False).latest_step()
  assert 0 < saved < results["steps"]
  resumed = train_and_evaluate(config, workdir)
  assert resumed["steps"] == results["steps"]
  assert resumed["test_top1"] == pytest.approx(results["test_top1"], abs=0.3)
  assert resumed["test_loss"] == pytest.approx(results["test_loss"], rel=1e-3)


def test_qat_from_fp32_under_uniform_and_json_policies(tmp_path, fp32_run):
  config, fp32_dir, fp32 = fp32_run
  qat = config.replace(mode="qat", policy="w8a8", init_from=fp32_dir, epochs=1,
                       learning_rate=0.005)
  w8 = train_and_evaluate(qat, str(tmp_path / "w8a8"))
  assert w8["test_top1"] > fp32["test_top1"] - 3.0
  assert {l["w_bits"] for l in w8["policy"]} == {8}
  table = json.load(open(os.path.join(fp32_dir, "layers.json")))
  names = [r["name"] for r in table]
  path = str(tmp_path / "mixed.json")
  save_policy(path, Policy.create(names, [8] + [2] * (len(names) - 1), 4))
  mixed = train_and_evaluate(qat.replace(policy=path), str(tmp_path / "mixed"))
  assert [l["w_bits"] for l in mixed["policy"]] == [8] + [2] * (len(names) - 1)
  saved = json.load(open(tmp_path / "mixed" / "policy.json"))
  assert [l["name"] for l in saved["layers"]] == names


def test_qat_on_frozen_bn_statistics_keeps_them(tmp_path, fp32_run):
  config, fp32_dir, fp32 = fp32_run
  qat = config.replace(mode="qat", policy="w4a4", init_from=fp32_dir, epochs=1,
                       learning_rate=0.005, freeze_bn_stats=True)
  assert trainer.build_model(qat, 10).freeze_bn_stats
  assert not trainer.build_model(qat.replace(freeze_bn_stats=False), 10).freeze_bn_stats
  frozen = train_and_evaluate(qat, str(tmp_path / "frozen"))
  assert frozen["test_top1"] > fp32["test_top1"] - 5.0, frozen
  before = restore_variables(fp32_dir)
  after = restore_variables(str(tmp_path / "frozen"))
  same = jax.tree.map(np.array_equal, before["batch_stats"], after["batch_stats"])
  assert all(jax.tree.leaves(same))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       before["params"]["conv1_bn"], after["params"]["conv1_bn"])
  assert all(jax.tree.leaves(moved))  # BN's scale and bias still train.


def test_policy_for_another_model_is_rejected(tmp_path, fp32_run):
  config, fp32_dir, _ = fp32_run
  path = str(tmp_path / "bad.json")
  save_policy(path, Policy.uniform(("a", "b"), 4, 4))
  with pytest.raises(ValueError, match="has 2 layers; the model has"):
    train_and_evaluate(config.replace(mode="qat", policy=path), str(tmp_path / "x"))


def test_workdir_of_another_run_is_refused(tmp_path, fp32_run):
  config, fp32_dir, _ = fp32_run
  with pytest.raises(ValueError, match="holds a run with learning_rate=0.05"):
    train_and_evaluate(config.replace(learning_rate=0.2), fp32_dir)


def test_corrupted_checkpoint_is_one_clear_error(tmp_path, fp32_run):
  config, _, _ = fp32_run
  workdir = tmp_path / "run"
  train_and_evaluate(config.replace(epochs=1), str(workdir))
  step_dir = workdir / "checkpoints" / str(Checkpointer(str(workdir), create=False).latest_step())
  for root, _, files in os.walk(step_dir / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(ValueError, match="checkpoint .* cannot be read"):
    train_and_evaluate(config.replace(epochs=1), str(workdir))
  assert (workdir / "results.json").exists()  # Nothing already written is lost.


def test_init_from_wrong_model_is_rejected(tmp_path, fp32_run):
  config, fp32_dir, _ = fp32_run
  other = config.replace(model="quickstart_cnn", dataset="digits")
  with pytest.raises(ValueError, match="init_from=.*do not fit model"):
    train_and_evaluate(other.replace(init_from=fp32_dir), str(tmp_path / "y"))


def test_qat_with_stochastic_rounding(tmp_path, fp32_run, monkeypatch):
  config, fp32_dir, _ = fp32_run
  real_build = trainer.build_model

  def stochastic_model(config, num_classes):  # No flag selects stochastic rounding.
    model = real_build(config, num_classes)
    return model.clone(quant_scheme=quant.QuantScheme(
        weight=quant.MinMaxWeight(spec=quant.AffineSpec(channel_axis=-1,
                                                        rounding="stochastic")),
        act=quant.MinMaxActivation(rounding="stochastic")))

  monkeypatch.setattr(trainer, "build_model", stochastic_model)
  qat = config.replace(mode="qat", policy="w4a4", init_from=fp32_dir, epochs=1,
                       learning_rate=0.005)
  first = train_and_evaluate(qat, str(tmp_path / "a"))
  assert first["test_top1"] > 50.0, first
  again = train_and_evaluate(qat, str(tmp_path / "b"))  # Keys depend on seed and step.
  assert again["test_loss"] == first["test_loss"]
