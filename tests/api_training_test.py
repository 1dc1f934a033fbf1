"""haqjax.quantize / evaluate / finetune on a plain flax model and numpy arrays."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import haqjax
from haqjax import models
from haqjax.api import training
from haqjax.deploy import build
from haqjax.deploy import engine
from deploy_wrapped_test import TinyViT


class Net(nn.Module):
  """A plain flax model, as a user writes it."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=2)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(3)(x)


def _data(n, seed):
  """Three classes told apart by brightness: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = (y[:, None, None, None] - 1.0 + 0.3 * rng.standard_normal((n, 6, 6, 1)))
  return x.astype(np.float32), y


@pytest.fixture(scope="module")
def setup():
  model = Net()
  variables = model.init(jax.random.key(1), jnp.zeros((1, 6, 6, 1)))
  qmodel, qvars = haqjax.quantize(model, variables, (1, 6, 6, 1))
  return model, variables, qmodel, qvars


def test_quantize_wraps_a_plain_model_and_keeps_its_arrays(setup):
  model, variables, qmodel, qvars = setup
  assert isinstance(qmodel, haqjax.nn.Quantized) and training.takes_policy(qmodel)
  assert "act_quant" in qvars["params"]["Conv_0"]
  assert _equal(_strip_quantizers(qvars["params"]), variables["params"])
  assert _equal(qvars["batch_stats"], variables["batch_stats"])
  assert haqjax.layer_table(qmodel, (1, 6, 6, 1)).names == ("Conv_0", "Dense_0")


def _equal(a, b) -> bool:
  """Same structure and bit-equal leaves."""
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                       jax.tree.leaves(b))))


def _strip_quantizers(tree):
  return {k: _strip_quantizers(v) for k, v in tree.items()
          if k not in ("weight_quant", "act_quant")} if isinstance(tree, dict) else tree


def test_quantize_keeps_a_haqjax_model_and_adds_its_quantizers():
  model = models.create("digits_cnn", num_classes=10,
                        quant_scheme=training.default_scheme())  # Static ranges.
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  fp32 = {"params": _strip_quantizers(variables["params"]),
          "batch_stats": variables.get("batch_stats", {})}
  assert not _equal(fp32["params"], variables["params"])
  same, qvars = haqjax.quantize(model, fp32, (1, 8, 8, 1))
  assert same is model
  assert jax.tree.structure(qvars["params"]) == jax.tree.structure(variables["params"])
  assert _equal(_strip_quantizers(qvars["params"]), fp32["params"])


def test_fp32_evaluate_is_the_users_own_apply(setup):
  model, variables, qmodel, qvars = setup
  x, y = _data(50, 0)
  direct = 100.0 * np.mean(np.argmax(model.apply(variables, x), -1) == y)
  got = haqjax.evaluate(qmodel, qvars, (x, y), batch_size=16)
  assert got["count"] == 50
  np.testing.assert_allclose(got["top1"], direct, atol=1e-9)


def test_finetune_learns_under_a_policy(setup):
  _, _, qmodel, qvars = setup
  x, y = _data(512, 1)
  xt, yt = _data(200, 2)
  policy = haqjax.Policy.uniform(("Conv_0", "Dense_0"), 4, 4)
  before = haqjax.evaluate(qmodel, haqjax.calibrate(qmodel, qvars, (x, y), policy),
                           (xt, yt), policy)["top1"]
  tuned = haqjax.finetune(qmodel, qvars, (x, y), policy, epochs=2, learning_rate=0.1,
                          batch_size=64)
  after = haqjax.evaluate(qmodel, tuned, (xt, yt), policy)["top1"]
  # Three balanced classes: chance is ~33%; separable ones are learnt.
  assert after >= 90.0 > before, (before, after)
  # The user's variables are not touched (no donation).
  assert float(jnp.abs(qvars["params"]["Dense_0"]["kernel"]).sum()) > 0


def test_finetune_checks_its_arguments(setup):
  _, _, qmodel, qvars = setup
  x, y = _data(10, 0)
  with pytest.raises(ValueError, match="epochs=0"):
    haqjax.finetune(qmodel, qvars, (x, y), None, epochs=0)
  with pytest.raises(ValueError, match="batch_size=128 is larger"):
    haqjax.finetune(qmodel, qvars, (x, y), None)
  with pytest.raises(ValueError, match=r"warmup_epochs=1.5; allowed: 0..epochs \(1.0\)"):
    haqjax.finetune(qmodel, qvars, (x, y), None, epochs=1.0, warmup_epochs=1.5)
  with pytest.raises(ValueError, match="warmup_epochs=-1"):
    haqjax.finetune(qmodel, qvars, (x, y), None, warmup_epochs=-1)


def test_finetune_warmup_rises_linearly_from_zero(setup):
  """Warm-up rates 0, peak / W, ...: its first step moves no parameter."""
  _, _, qmodel, qvars = setup
  x, y = _data(64, 3)  # Four batches of 16: a quarter epoch is one step.
  fp32 = functools.partial(haqjax.finetune, qmodel, qvars, (x, y), None, batch_size=16,
                           optimizer="sgd", momentum=0.0)
  assert _equal(fp32(epochs=0.25, warmup_epochs=0.25, learning_rate=0.1)["params"],
                qvars["params"])
  assert not _equal(fp32(epochs=0.25, learning_rate=0.1)["params"], qvars["params"])
  # Two steps: rates 0 and 0.05 under a two-step warm-up to 0.1, and 0 and
  # 0.05 (the cosine's start) under a one-step warm-up to 0.05.
  two = fp32(epochs=0.5, warmup_epochs=0.5, learning_rate=0.1)["params"]
  one = fp32(epochs=0.5, warmup_epochs=0.25, learning_rate=0.05)["params"]
  assert not _equal(two, qvars["params"])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), two, one)


def _integer_figures(qmodel, variables, policy, x, y):
  """Top-1 and agreement (percent) of the integer graph, computed directly."""
  graph = build.build(qmodel, variables, policy, x[:1])
  ours = np.argmax(np.asarray(engine.run(graph, x)), -1)
  theirs = np.argmax(np.asarray(qmodel.apply(variables, x, policy=policy)), -1)
  return 100.0 * np.mean(ours == y), 100.0 * np.mean(ours == theirs)


@pytest.mark.parametrize("w_bits, a_bits", [((8, 8), (8, 8)), ((3, 2), (2, 3))])
def test_evaluate_reports_the_integer_model(setup, w_bits, a_bits):
  _, _, qmodel, qvars = setup
  x, y = _data(50, 3)
  policy = haqjax.Policy.create(("Conv_0", "Dense_0"), np.array(w_bits), np.array(a_bits))
  calibrated = haqjax.calibrate(qmodel, qvars, (x, y), policy, batch_size=16)
  # 50 examples in batches of 16: the padded last batch is masked out.
  got = haqjax.evaluate(qmodel, calibrated, (x, y), policy, batch_size=16)
  top1, agree = _integer_figures(qmodel, calibrated, policy, x, y)
  assert got["integer_top1"] == pytest.approx(top1)
  assert got["integer_agreement"] == pytest.approx(agree)
  fake = haqjax.evaluate(qmodel, calibrated, (x, y), policy, batch_size=16, integer=False)
  assert fake == {k: v for k, v in got.items() if not k.startswith("integer_")}
  # A float model has no integer figures.
  assert "integer_top1" not in haqjax.evaluate(qmodel, calibrated, (x, y), batch_size=16)


def test_evaluate_of_a_model_the_engine_cannot_lower(setup):
  model = haqjax.nn.quantized(TinyViT())
  x, y = _data(8, 0)
  variables = model.init(jax.random.key(0), x[:1])
  policy = haqjax.Policy.uniform(haqjax.layer_table(model, x.shape).names, 8, 8)
  auto = haqjax.evaluate(model, variables, (x, y), policy)
  assert set(auto) == {"loss", "top1", "top5", "count"}
  asked = haqjax.evaluate(model, variables, (x, y), policy, integer=True)
  assert asked["integer_top1"] is None and asked["top1"] == auto["top1"]
  assert re.fullmatch(r"ValueError: deploy: 'LayerNorm_0' uses \w+; allowed ops: .*",
                      asked["integer_reason"])


def test_evaluate_checks_integer(setup):
  _, _, qmodel, qvars = setup
  x, y = _data(10, 0)
  with pytest.raises(ValueError, match="integer is 'yes'; allowed: True, False or 'auto'"):
    haqjax.evaluate(qmodel, qvars, (x, y), integer="yes")
  with pytest.raises(ValueError, match="integer=True with policy None"):
    haqjax.evaluate(qmodel, qvars, (x, y), integer=True)


def test_finetune_on_frozen_bn_statistics_keeps_them(setup):
  model, variables, qmodel, qvars = setup
  x, y = _data(256, 3)
  policy = haqjax.Policy.uniform(("Conv_0", "Dense_0"), 4, 4)
  frozen = haqjax.finetune(qmodel, qvars, (x, y), policy, epochs=1, learning_rate=0.1,
                           batch_size=64, freeze_bn_stats=True)
  moving = haqjax.finetune(qmodel, qvars, (x, y), policy, epochs=1, learning_rate=0.1,
                           batch_size=64)
  assert _equal(frozen["batch_stats"], qvars["batch_stats"])
  assert not _equal(moving["batch_stats"], qvars["batch_stats"])
  bn = frozen["params"]["BatchNorm_0"]
  assert not np.array_equal(bn["scale"], qvars["params"]["BatchNorm_0"]["scale"])
  # In training the frozen wrapper is its eval-mode self.
  fmodel = haqjax.nn.quantized(model, freeze_bn_stats=True)
  train, updates = fmodel.apply(qvars, x[:32], policy=policy, train=True,
                                mutable=["batch_stats"])
  np.testing.assert_array_equal(train, fmodel.apply(qvars, x[:32], policy=policy,
                                                    train=False))
  assert _equal(updates["batch_stats"], qvars["batch_stats"])
  with pytest.raises(ValueError, match="freeze_bn_stats is 1; allowed: True or False"):
    haqjax.nn.quantized(model, freeze_bn_stats=1)
  with pytest.raises(ValueError, match="freeze_bn_stats=True for a Net; allowed"):
    haqjax.finetune(model, variables, (x, y), None, freeze_bn_stats=True, batch_size=64)


class CallTimeBN(nn.Module):
  """`Net` with BN's mode given at call time, positionally."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=2)(x)
    x = nn.BatchNorm()(x, not train)
    return nn.Dense(3)(nn.relu(x).reshape(x.shape[0], -1))


def test_frozen_bn_statistics_with_the_mode_given_at_call_time():
  model = CallTimeBN()
  x, _ = _data(16, 4)
  variables = model.init(jax.random.key(0), x[:1])
  variables = {**variables, "batch_stats": jax.tree.map(lambda v: v + 0.5,
                                                        variables["batch_stats"])}
  for frozen in (True, False):
    qmodel = haqjax.nn.quantized(model, freeze_bn_stats=frozen)
    qvars = haqjax.nn.init_quantizers(qmodel, variables, x[:1])
    train, updates = qmodel.apply(qvars, x, train=True, mutable=["batch_stats"])
    evaluated = qmodel.apply(qvars, x, train=False)
    assert np.array_equal(train, evaluated) == frozen
    assert _equal(updates["batch_stats"], variables["batch_stats"]) == frozen
