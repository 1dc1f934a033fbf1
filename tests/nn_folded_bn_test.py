"""Folded-BN QAT: same variables, eval equal to PTQ folding, BN training."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.models.cnn import conv_bn
from haqjax.nn import layer_table
from haqjax.nn.layers import QDense
from haqjax.policy import Policy
from haqjax.ptq import folding
from haqjax.train import steps
from ptq_testing import random_variables as _random_variables

SHAPE = (8, 8, 1)


class _Separable(nn.Module):
  """conv, depthwise and linear pointwise conv-BN layers, GAP, dense."""
  fold_bn: bool = False
  freeze_bn_stats: bool = False

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    x = conv_bn(x, policy, "stem", 8, 3, train=train)
    x = conv_bn(x, policy, "depthwise", 8, 3, 2, train=train, depthwise=True)
    x = conv_bn(x, policy, "pointwise", 12, 1, train=train, act=None)
    return QDense(10, name="classifier")(jnp.mean(x, axis=(1, 2)), policy)


def _models(name, **kwargs):
  if name == "separable":
    return _Separable(**kwargs), _Separable(fold_bn=True, **kwargs)
  return (models.create(name, num_classes=10, **kwargs),
          models.create(name, num_classes=10, fold_bn=True, **kwargs))


def _variables(model, seed=0):
  """BN gammas of both signs; running statistics far from (0, 1)."""
  return _random_variables(model, SHAPE, lambda rng, c: {
      "scale": rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c, p=[.1, .9]),
      "bias": rng.normal(0, 0.5, c), "mean": rng.normal(0, 0.3, c),
      "var": rng.uniform(0.5, 2.0, c)}, seed)


def _images(n=8, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, *SHAPE))


def _close(out, ref, rtol=1e-5):
  scale = float(jnp.abs(ref).max())
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name, shape", [
    ("quickstart_cnn", (28, 28, 1)), ("mobilenet_v2_small", (32, 32, 3)),
    ("resnet_small", (32, 32, 3)), ("mobilenet_v1", (64, 64, 3))])
def test_variables_and_layer_table_are_those_of_the_plain_model(name, shape):
  plain, folded = _models(name)
  init = lambda m: jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, *shape)))
  a, b = init(plain), init(folded)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), a) == jax.tree.map(
      lambda s: (s.shape, s.dtype), b)
  assert layer_table(plain, (1, *shape)).rows() == layer_table(folded, (1, *shape)).rows()


@pytest.mark.parametrize("name", ["digits_cnn", "separable"])
def test_init_values_are_those_of_the_plain_model(name):
  plain, folded = _models(name)
  x = _images(2)
  a = plain.init(jax.random.key(0), x, train=True)
  b = folded.init(jax.random.key(0), x, train=True)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", ["digits_cnn", "separable"])
def test_eval_equals_ptq_folding_then_the_plain_quantized_model(name):
  plain, folded = _models(name)
  variables = _variables(plain)
  names = layer_table(plain, (1, *SHAPE)).names
  x = _images()
  rng = np.random.default_rng(0)
  apply_plain, apply_folded = jax.jit(plain.apply), jax.jit(folded.apply)
  ptq_folded = folding.fold_batch_norms(plain, variables)
  for policy in (Policy.uniform(names, 4, 4), Policy.uniform(names, 8, 32),
                 Policy.create(names, rng.integers(2, 9, len(names)),
                               rng.integers(2, 9, len(names)))):
    _close(apply_folded(variables, x, policy=policy),
           apply_plain(ptq_folded, x, policy=policy))
  # Floating point: the plain model, with or without folding its variables.
  ref = apply_plain(variables, x)
  _close(apply_folded(variables, x), ref)
  _close(apply_folded(ptq_folded, x), ref)


@pytest.mark.parametrize("name", ["digits_cnn", "separable"])
def test_float_training_is_batchnorm_training(name):
  plain, folded = _models(name)
  variables = _variables(plain)
  x = _images()

  def loss(model, params):
    out, upd = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
    return jnp.sum(out ** 2), (out, upd["batch_stats"])

  grad = lambda m: jax.jit(jax.grad(functools.partial(loss, m), has_aux=True))(
      variables["params"])
  (g_plain, (out_plain, stats_plain)), (g_fold, (out_fold, stats_fold)) = (
      grad(plain), grad(folded))
  _close(out_fold, out_plain)
  jax.tree.map(_close, stats_fold, stats_plain)
  jax.tree.map(lambda a, b: _close(a, b, 1e-4), g_fold, g_plain)
  # The running statistics moved, by BN_MOMENTUM's share of the batch ones.
  assert not np.allclose(stats_fold["stem_bn"]["mean"],
                         variables["batch_stats"]["stem_bn"]["mean"])


@pytest.mark.parametrize("name", ["digits_cnn", "separable"])
def test_quantized_training_has_finite_gradients_and_updates_stats(name):
  plain, folded = _models(name)
  variables = _variables(plain)
  policy = Policy.uniform(layer_table(plain, (1, *SHAPE)).names, 4, 4)
  x = _images()

  def loss(params):
    out, upd = folded.apply({**variables, "params": params}, x, policy=policy,
                            train=True, mutable=["batch_stats"])
    return jnp.mean(out ** 2), upd["batch_stats"]

  grads, stats = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  for g in jax.tree.leaves(grads):
    assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(grads["stem_bn"]["scale"]).max()) > 0
  # The float pass that gives the batch statistics sees the quantized input,
  # as the unfolded BN does; with float weights the two train identically.
  a4 = Policy.uniform(policy.names, 32, 4)
  out_plain, upd_plain = plain.apply(variables, x, policy=a4, train=True,
                                     mutable=["batch_stats"])
  out_fold, upd_fold = folded.apply(variables, x, policy=a4, train=True,
                                    mutable=["batch_stats"])
  _close(out_fold, out_plain)
  jax.tree.map(_close, upd_fold, upd_plain)


def test_frozen_statistics_train_as_eval_and_stay():
  _, folded = _models("separable")
  folded = folded.clone(freeze_bn_stats=True)
  variables = _variables(folded)
  policy = Policy.uniform(layer_table(folded, (1, *SHAPE)).names, 4, 4)
  x = _images()
  out, upd = folded.apply(variables, x, policy=policy, train=True,
                          mutable=["batch_stats"])
  _close(out, folded.apply(variables, x, policy=policy))
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"],
               variables["batch_stats"])


def test_qat_steps_reduce_the_loss_and_trace_once_across_policies():
  _, model = _models("digits_cnn")
  tx = steps.make_optimizer(name="sgd", learning_rate=0.05, momentum=0.9,
                            weight_decay=0.0)
  state = steps.init_state(jax.random.key(0), model, tx, (1, *SHAPE))
  names = layer_table(model, (1, *SHAPE)).names
  batch = {"image": _images(32), "label": jnp.arange(32) % 10}
  traces = {"train": 0, "eval": 0}

  def counted(kind, fn):
    def wrapper(*args):
      traces[kind] += 1
      return fn(*args)
    return wrapper

  train_step = jax.jit(counted("train", functools.partial(steps.train_step, model, tx)))
  eval_step = jax.jit(counted("eval", functools.partial(steps.eval_step, model)))
  w4a4 = Policy.uniform(names, 4, 4)
  losses = []
  for _ in range(30):
    state, metrics = train_step(state, batch, w4a4)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  # A prediction that ignores the image has a cross-entropy of at least the
  # entropy of the label frequencies (its minimum, reached by predicting the
  # frequencies): a loss below it means the QAT steps learned from the images.
  freq = np.bincount(np.asarray(batch["label"])) / len(batch["label"])
  label_entropy = float(-np.sum(freq * np.log(freq)))
  assert losses[-1] < label_entropy, (label_entropy, losses)
  rng = np.random.default_rng(0)
  for _ in range(5):
    policy = Policy.create(names, rng.integers(1, 9, len(names)),
                           rng.integers(1, 9, len(names)))
    state, metrics = train_step(state, batch, policy)
    assert np.isfinite(float(metrics["loss"]))
    assert np.isfinite(float(eval_step(state.variables(), batch, policy)["loss"]))
  assert traces == {"train": 1, "eval": 1}


@pytest.mark.parametrize("field", ["fold_bn", "freeze_bn_stats"])
def test_create_rejects_a_non_bool(field):
  with pytest.raises(ValueError, match=f"{field} is 'yes'; allowed: True or False"):
    models.create("digits_cnn", num_classes=10, **{field: "yes"})


def test_calibration_sets_weight_quantizers_on_the_folded_kernel():
  from haqjax import quant  # pylint: disable=g-import-not-at-top
  from haqjax.nn import calibrate as calibrate_lib  # pylint: disable=g-import-not-at-top
  scheme = quant.QuantScheme(weight=quant.weight_quantizer("lsq"),
                             act=quant.act_quantizer("dynamic"))
  model = models.create("quickstart_cnn", num_classes=10, fold_bn=True,
                        quant_scheme=scheme)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  rng = np.random.RandomState(0)
  stats = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.2, 3.0, v.shape), v.dtype),
                       variables["batch_stats"])
  variables = {**variables, "batch_stats": stats}
  table = layer_table(model, (1, 28, 28, 1))
  policy = Policy.uniform(table.names, 4, 4)
  images = jax.random.normal(jax.random.key(1), (16, 28, 28, 1))
  out = calibrate_lib.calibrate(model, variables, [images], policy)
  wq = scheme.weight
  name = table.names[1]  # A conv-BN layer.
  layer = out["params"][name]
  kernel, _ = folding.folded_kernel_and_bias(
      variables["params"][name]["kernel"], variables["params"][f"{name}_bn"],
      stats[f"{name}_bn"])
  want = wq.calibrate(variables["params"][name]["weight_quant"], kernel, 4)
  plain = wq.calibrate(variables["params"][name]["weight_quant"],
                       variables["params"][name]["kernel"], 4)
  # Calibration runs compiled, where XLA may fold and sum the mean |w| in
  # another order: reordering a sum of n non-negative float32 terms moves it by
  # at most (n - 1) * 2^-24 relative, and the fold and step round a few more
  # times, each by at most 2^-24.
  n = int(np.prod(kernel.shape[:-1]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=(n + 8) * 2.0 ** -24),
               layer["weight_quant"], want)
  assert not all(np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(want), jax.tree.leaves(plain)))
