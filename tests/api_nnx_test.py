"""The public API on flax NNX models: the linen twin's tables, scores and variables."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import haqjax
from haqjax.nn import nnx_update
from haqjax.nn import nnx_variables
from haqjax.policy import Policy

SHAPE = (8, 8, 3)


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=8, name="dw")(x))
    return nn.Dense(4, name="head")(x.mean((1, 2)))


class NnxCNN(nnx.Module):
  """`LinenCNN` in NNX, with the same attribute names."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.dw = nnx.Conv(8, 8, (3, 3), strides=2, feature_group_count=8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    return self.head(nnx.relu(self.dw(x)).mean((1, 2)))


def nnx_cnn(seed=0):
  """An `NnxCNN` with BN statistics and affine parameters that are not the init's."""
  model = NnxCNN(nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  variables = nnx_variables(model)
  bn = {"params": {"scale": rng.uniform(0.5, 1.5, 8), "bias": rng.normal(size=8) * 0.1},
        "batch_stats": {"mean": rng.normal(size=8) * 0.1, "var": rng.uniform(0.5, 2, 8)}}
  for col, values in bn.items():
    variables[col]["bn1"] = {k: np.asarray(v, np.float32) for k, v in values.items()}
  nnx_update(model, variables)
  model.eval()  # Its own calls below use the running statistics, as evaluate does.
  return model


def arrays(n, seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, *SHAPE)).astype(np.float32), rng.integers(0, 4, n)


@pytest.fixture(scope="module")
def twins():
  model = nnx_cnn()
  return model, LinenCNN(), nnx_variables(model)


def test_quantize_and_evaluate_an_nnx_model_as_its_linen_twin(twins):
  model, linen, variables = twins
  x, y = arrays(32, 0)
  qmodel, qvars = haqjax.quantize(model, None, x[:1])
  lmodel, lvars = haqjax.quantize(linen, variables, x[:1])
  table = haqjax.layer_table(qmodel, x.shape)
  assert table.rows() == haqjax.layer_table(lmodel, x.shape).rows()
  assert table.names == ("conv1", "dw", "head")
  assert jax.tree.structure(qvars) == jax.tree.structure(lvars)
  # Converted once: the same module each time, so compiled steps are reused.
  assert haqjax.quantize(model, nnx.state(model), x[:1])[0] is qmodel
  fp32 = haqjax.evaluate(model, None, (x, y))
  assert fp32 == haqjax.evaluate(lmodel, lvars, (x, y))
  want = float(np.mean(np.argmax(np.asarray(model(jnp.asarray(x))), -1) == y)) * 100
  assert fp32["top1"] == pytest.approx(want)
  policy = Policy.uniform(table.names, 2, 2)
  w2a2 = haqjax.evaluate(model, haqjax.calibrate(model, None, (x, y), policy), (x, y),
                         policy)
  lw2a2 = haqjax.evaluate(lmodel, haqjax.calibrate(lmodel, lvars, (x, y), policy),
                          (x, y), policy)
  # nnx.BatchNorm and nn.BatchNorm round in another order; at 2 bits an
  # activation on a grid boundary may then land on the neighbouring step.
  assert w2a2["top1"] == lw2a2["top1"]
  assert w2a2["loss"] == pytest.approx(lw2a2["loss"], rel=1e-3)
  assert abs(w2a2["loss"] - fp32["loss"]) > 1e-2


def test_finetuned_variables_go_back_into_the_nnx_model(twins):
  _, linen, variables = twins
  model = nnx_cnn()
  x, y = arrays(32, 1)
  policy = Policy.uniform(("conv1", "dw", "head"), 4, 4)
  tuned = haqjax.finetune(model, None, (x, y), policy, epochs=2, batch_size=16)
  lmodel, lvars = haqjax.quantize(linen, variables, x[:1])
  ltuned = haqjax.finetune(lmodel, lvars, (x, y), policy, epochs=2, batch_size=16)
  for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(ltuned)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  before = np.asarray(model(jnp.asarray(x)))
  nnx_update(model, tuned)
  after = np.asarray(model(jnp.asarray(x)))
  assert np.abs(after - before).max() > 1e-4  # trained: the weights moved
  np.testing.assert_allclose(after, linen.apply(ltuned, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="variables lack params/bn1/bias"):
    nnx_update(model, {"params": {"conv1": tuned["params"]["conv1"]}})


def test_finetune_of_an_nnx_model_on_frozen_bn_statistics(twins):
  model, _, _ = twins
  x, y = arrays(64, 5)
  policy = Policy.uniform(("conv1", "dw", "head"), 4, 4)
  qmodel, qvars = haqjax.quantize(model, None, x[:1])
  frozen = haqjax.finetune(model, None, (x, y), policy, epochs=1, batch_size=32,
                           learning_rate=0.1, freeze_bn_stats=True)
  moving = haqjax.finetune(model, None, (x, y), policy, epochs=1, batch_size=32,
                           learning_rate=0.1)
  stats = qvars["batch_stats"]["bn1"]
  for k in ("mean", "var"):
    np.testing.assert_array_equal(frozen["batch_stats"]["bn1"][k], stats[k])
    assert not np.array_equal(moving["batch_stats"]["bn1"][k], stats[k])
  assert not np.array_equal(frozen["params"]["bn1"]["scale"], qvars["params"]["bn1"]["scale"])
  fmodel = haqjax.nn.nnx_quantized(model, freeze_bn_stats=True)
  train, _ = fmodel.apply(qvars, x[:8], policy=policy, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(train, fmodel.apply(qvars, x[:8], policy=policy, train=False))


class TrainSwitch(nnx.Module):
  """An NNX model whose `__call__` takes `train` (its output doubles in training)."""

  def __init__(self, rngs):
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x, train: bool = False):
    y = self.head(x)
    return 2.0 * y if train else y


@pytest.mark.parametrize("frozen", [False, True])
def test_train_reaches_an_nnx_models_own_argument(frozen):
  model = TrainSwitch(nnx.Rngs(0))
  qmodel = haqjax.nn.nnx_quantized(model, freeze_bn_stats=frozen)
  x = np.ones((4, 3), np.float32)
  qvars = haqjax.nn.init_quantizers(qmodel, nnx_variables(model), x)
  np.testing.assert_allclose(qmodel.apply(qvars, x, train=True),
                             2.0 * qmodel.apply(qvars, x, train=False), rtol=1e-6)
