"""The integer model of a plain flax CNN wrapped by `haqjax.nn.quantized`.

Its intercepted `nn.Conv` / `nn.Dense` calls lower as `QConv` / `QDense`
layers do (the BatchNorm that reads a conv folds into its accumulator), so:

* predictions agree with the fake-quantized wrapped model's as the haqjax
  models' do (`deploy_engine_test`: a flip needs a near tie);
* the graph equals the haqjax-layer twin's (same variables, calibrated
  ranges and lowering): the same nodes and bit for bit the same logits;
* `haqjax.search_policy` reports the integer top-1; a model with layer
  norms and attention still gets a one-line reason naming the op.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import haqjax
from haqjax import models
from haqjax.deploy import agreement
from haqjax.deploy import build
from haqjax.deploy import engine
from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import layer_table
from haqjax.nn import pointwise
from haqjax.nn import quantized
from haqjax.policy import Policy
from nn_intercept_resnet_test import SCHEME
from nn_intercept_resnet_test import ResNet
from nn_intercept_testing import random_variables

SHAPE = (8, 8, 3)


@pytest.fixture(autouse=True)
def xla_convolutions(monkeypatch):
  """The haqjax layers run 1x1 convolutions as XLA's, as flax's nn.Conv does."""
  monkeypatch.setattr(pointwise, "MATMUL_BACKENDS", ())


def _check_predictions(graph, model, variables, x):
  """At most the near ties (top-2 margin within twice the logit error) flip."""
  ours = np.asarray(engine.run(graph, x))
  theirs = np.asarray(agreement.fake_quant_run(model, variables, x, graph.policy)[0])
  diff = float(np.max(np.abs(ours - theirs)))
  top2 = np.sort(theirs, axis=-1)[:, -2:]
  near_ties = int(np.sum(top2[:, 1] - top2[:, 0] <= 2 * diff))
  flips = int(np.sum(np.argmax(ours, -1) != np.argmax(theirs, -1)))
  assert flips <= near_ties, (flips, near_ties, diff)
  return ours


def test_wrapped_resnet_equals_the_haqjax_twin_s_integer_model():
  haq = models.resnet_small(depth=8, width_mult=0.5).clone(quant_scheme=SCHEME)
  plain = quantized(ResNet(), SCHEME)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, *SHAPE)), jnp.float32)
  variables = random_variables(haq, x[:1])
  names = layer_table(plain, (1, *SHAPE)).names
  # Min-max ranges do not depend on the bits: one calibration serves both.
  calibrated = [calibrate_lib.calibrate(model, variables, [x], Policy.uniform(names, 8, 8))
                for model in (plain, haq)]
  for bits in (8, 4):
    policy = Policy.uniform(names, bits, bits)
    graphs, logits = [], []
    for model, model_vars in zip((plain, haq), calibrated):
      graph = build.build(model, model_vars, policy, x[:1])
      logits.append(_check_predictions(graph, model, model_vars, x))
      graphs.append(graph)
    got, want = graphs
    assert got.layers() == want.layers() == names
    assert [(n.name, n.op) for n in got.nodes] == [(n.name, n.op) for n in want.nodes]
    # Every BatchNorm folded into its conv (no node of its own), as in the twin.
    assert not any("_bn" in n.name for n in got.nodes)
    np.testing.assert_array_equal(logits[0], logits[1])


class SmallCNN(nn.Module):
  """A user's CNN: conv-BN-ReLU, a residual conv-BN, a mean pool and a head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    x = nn.relu(norm("bn1")(nn.Conv(4, (3, 3), name="conv1")(x)))
    y = norm("bn2")(nn.Conv(4, (3, 3), name="conv2")(x))
    x = nn.relu(x + y)
    return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


class TinyViT(nn.Module):
  """Patches, a layer norm and attention: ops the integer graph has no node for."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), strides=3, padding="VALID", name="patch")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
    return nn.Dense(3)(x.mean(axis=1))


def _arrays(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = y[:, None, None, None] - 1.0 + 0.3 * rng.standard_normal((n, 6, 6, 1))
  return x.astype(np.float32), y


def test_search_policy_reports_the_integer_top1_of_a_plain_cnn():
  model = SmallCNN()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
  test_x, test_y = _arrays(32, 2)
  result = haqjax.search_policy(
      model, variables, _arrays(64, 0), _arrays(32, 1), test=(test_x, test_y),
      method="rl", episodes=3, episode_steps=2, batch_size=16, finetune_epochs=0,
      budget="w4a4", eval_batch_size=32)
  assert result.integer.get("top1") is not None, result.integer
  graph = build.build(result.model, result.variables, result.policy, test_x[:1])
  ours = _check_predictions(graph, result.model, result.variables, test_x)
  assert result.integer["top1"] == pytest.approx(
      100.0 * np.mean(np.argmax(ours, -1) == test_y))
  assert "not built" not in result.report()


def test_a_vit_gets_one_line_naming_the_op():
  model = quantized(TinyViT(), SCHEME)
  x = jnp.zeros((1, 6, 6, 1))
  variables = model.init(jax.random.key(0), x)
  policy = Policy.uniform(layer_table(model, x.shape).names, 8, 8)
  with pytest.raises(ValueError, match=r"^deploy: 'LayerNorm_0' uses \w+; allowed ops"):
    build.build(model, variables, policy, x)


@pytest.mark.parametrize("kwargs, what", [
    (dict(kernel_dilation=2), "dilation"), (dict(padding="CIRCULAR"), "padding 'CIRCULAR'")])
def test_a_conv_the_integer_graph_cannot_express_is_named(kwargs, what):
  model = quantized(nn.Conv(4, (3, 3), **kwargs), SCHEME)  # The root: named 'Conv'.
  x = jnp.zeros((1, 6, 6, 1))
  variables = model.init(jax.random.key(0), x)
  policy = Policy.uniform(("Conv",), 8, 8)
  with pytest.raises(ValueError, match=f"^deploy: conv layer 'Conv' has {what}; allowed"):
    build.build(model, variables, policy, x)
