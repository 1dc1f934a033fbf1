"""The integer engine against the fake-quantized models it is built from.

Each model is random-initialised with non-trivial BatchNorm statistics,
given calibrated `StaticRange` activations and `MinMaxWeight` weights, and
compared at W8A8, W4A4 and a mixed policy:

* codes: every layer fed the fake-quant model's input codes (`forced`) gets
  the same codes but where its own rounding lands on the other side of a
  boundary: never more than one step apart, and one step apart at a rate
  below 1e-4. A flip needs the real value within float32 error (~1e-6
  relative), a wide tensor's step (~2^-29 of its bound) or half an
  accumulator step (at least 2^-10 of a product unit) of a rounding boundary;
  systematic errors (a bias rounded to product units, a double rounding)
  flip percents.
* predictions: a flip needs the fake-quant top-2 margin below twice the
  largest logit difference; at most the images with such a near tie may
  disagree.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.deploy import agreement
from haqjax.deploy import build
from haqjax.deploy import engine
from haqjax.nn import QConv
from haqjax.nn import layer_table
from haqjax.nn.calibrate import calibrate
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy
from haqjax.quant import MinMaxActivation
from haqjax.quant import MinMaxWeight
from haqjax.quant import QuantScheme
from haqjax.quant import StaticRange

SCHEME = QuantScheme(weight=MinMaxWeight(), act=StaticRange())
# Largest fraction of all codes one step apart (see above), and of one
# layer's (plus one code).
FLIP_RATE = 1e-4
LAYER_FLIP_RATE = 1e-4
CASES = {
    "quickstart_cnn": ({}, (28, 28, 1), 64),
    "resnet20": ({}, (32, 32, 3), 32),
    "mobilenet_v2_small": ({"width_mult": 0.25}, (16, 16, 3), 16),
}


def _randomize_bn(variables, seed):
  """BN statistics and affine parameters drawn at random (not the identity)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    if "_bn/" not in key:
      return leaf
    kind = key.rsplit("/", 1)[-1]
    low, high = {"var": (0.5, 2.0), "scale": (0.5, 1.5), "mean": (-0.3, 0.3),
                 "bias": (-0.2, 0.2)}[kind]
    return jnp.asarray(rng.uniform(low, high, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, variables)


def _images(shape, n, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *shape)), jnp.float32)


# ResNet-20's integer convolutions run many times slower without XLA's
# optimisation than they take to compile with it (tests/conftest.py); the
# other models' time is compiling.
_OPTIMIZED = ("resnet20",)


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=[pytest.mark.xla_optimized] if name in _OPTIMIZED else [])
    for name in CASES])
def setup(request):
  name = request.param
  kwargs, shape, n = CASES[name]
  model = models.create(name, num_classes=10, quant_scheme=SCHEME, **kwargs)
  x = _images(shape, n, 0)
  variables = _randomize_bn(jax.jit(model.init)(jax.random.PRNGKey(0), x[:1]), 1)
  names = layer_table(model, (1, *shape)).names
  return model, variables, x, names


def _policies(names):
  k = len(names)
  mixed = Policy.create(names, [(8, 4, 6, 3, 5, 7)[i % 6] for i in range(k)],
                        [(8, 6, 4, 5, 7, 8)[i % 6] for i in range(k)])
  return {"w8a8": Policy.uniform(names, 8, 8), "w4a4": Policy.uniform(names, 4, 4),
          "mixed": mixed}


def _check_predictions(graph, model, variables, x):
  ours = np.asarray(engine.run(graph, x))
  theirs = np.asarray(agreement.fake_quant_run(model, variables, x, graph.policy)[0])
  diff = float(np.max(np.abs(ours - theirs)))
  top2 = np.sort(theirs, axis=-1)[:, -2:]
  near_ties = int(np.sum(top2[:, 1] - top2[:, 0] <= 2 * diff))
  flips = int(np.sum(np.argmax(ours, -1) != np.argmax(theirs, -1)))
  assert flips <= near_ties, (flips, near_ties, diff)
  return flips, diff


def _check_codes(codes, label):
  for layer, c in codes.items():
    assert c.off_by_more == 0, (label, layer, c)
    assert c.off_by_one <= 1 + LAYER_FLIP_RATE * c.total, (label, layer, c)
  flips = sum(c.off_by_one for c in codes.values())
  assert flips <= FLIP_RATE * sum(c.total for c in codes.values()), (label, flips)


def test_agrees_with_fake_quant(setup):
  model, variables, x, names = setup
  traces = None
  policies = _policies(names)
  # Min-max ranges do not depend on the bits: one calibration serves all.
  calibrated = calibrate(model, variables, [x], policies["w8a8"])
  for label, policy in policies.items():
    graph = build.build(model, calibrated, policy, x[:1])
    _check_predictions(graph, model, calibrated, x)
    codes = agreement.compare_codes(graph, model, calibrated, x)
    assert set(codes) == set(names), label
    _check_codes(codes, label)
    if traces is None:
      traces = engine.trace_count()
  # One compilation of the engine served the three policies.
  assert engine.trace_count() == traces


def test_float_first_layer_and_folded_bn():
  model = models.create("quickstart_cnn", num_classes=10, quant_scheme=SCHEME, fold_bn=True)
  x = _images((28, 28, 1), 64, 2)
  variables = _randomize_bn(model.init(jax.random.PRNGKey(1), x[:1]), 3)
  names = layer_table(model, (1, 28, 28, 1)).names
  a_bits = [FLOAT_BITS] + [6] * (len(names) - 1)
  policy = Policy.create(names, [8, 4, 32, 5, 4, 6, 8], a_bits)
  calibrated = calibrate(model, variables, [x], policy)
  graph = build.build(model, calibrated, policy, x[:1])
  ops = {n.name: n.op for n in graph.nodes}
  assert ops["stem"] == "float_conv" and ops["conv2"] == "float_conv"
  assert ops["conv1"] == "conv"
  _check_predictions(graph, model, calibrated, x)
  codes = agreement.compare_codes(graph, model, calibrated, x)
  assert "stem" not in codes and "conv2" in codes  # conv2 reads codes, runs float
  _check_codes(codes, "float first layer")


class _Sine(nn.Module):
  @nn.compact
  def __call__(self, x, policy=None, train=False):
    x = QConv(4, (3, 3), name="conv")(x, policy)
    return jnp.sin(x).mean(axis=(1, 2))


def test_unsupported_op_is_one_error_naming_it():
  model = _Sine()
  x = jnp.ones((1, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  policy = Policy.uniform(("conv",), 8, 8)
  with pytest.raises(ValueError, match=r"^deploy: 'model' uses sin; allowed ops: QConv"):
    build.build(model, variables, policy, x)


def test_dynamic_activation_range_is_rejected():
  scheme = QuantScheme(weight=MinMaxWeight(), act=MinMaxActivation())
  model = models.create("quickstart_cnn", num_classes=10, quant_scheme=scheme)
  x = _images((28, 28, 1), 2, 0)
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  policy = Policy.uniform(layer_table(model, (1, 28, 28, 1)).names, 8, 8)
  with pytest.raises(ValueError, match="'stem' has activation quantizer MinMaxActivation"):
    build.build(model, variables, policy, x[:1])


def test_evaluate_equals_fake_quant_accuracy_on_digits():
  data = pytest.importorskip("haqjax.data")
  try:
    split = data.load("digits").test
  except data.DataNotFoundError:
    pytest.skip("digits not prepared")
  model = models.create("digits_cnn", num_classes=10, quant_scheme=SCHEME)
  variables = _randomize_bn(model.init(jax.random.PRNGKey(4), jnp.zeros((1, 8, 8, 1))), 5)
  names = layer_table(model, (1, 8, 8, 1)).names
  policy = Policy.uniform(names, 4, 4)
  images = next(data.batches(split, batch_size=128, shuffle=False, drop_remainder=True))
  calibrated = calibrate(model, variables, [images["image"]], policy)
  graph = build.build(model, calibrated, policy, images["image"][:1])
  top1 = agreement.evaluate(graph, split, batch_size=128)
  correct = n = 0
  for batch in data.batches(split, batch_size=128, shuffle=False, drop_remainder=False):
    logits = agreement.fake_quant_run(model, calibrated, batch["image"], policy)[0]
    hit = np.argmax(np.asarray(logits), -1) == np.asarray(batch["label"])
    correct += int(np.sum(hit * np.asarray(batch["mask"])))
    n += int(np.sum(batch["mask"]))
  assert n == len(split)
  # Each prediction that flips moves the accuracy by 1 / n; the logits agree
  # to float32 here (no near tie flips at W4A4 on 360 images).
  assert abs(top1 - correct / n) <= 1 / n


def _first_requantize(graph):
  """The first `requantize` of `graph` that reads a convolution's accumulator."""
  return next(n for n in graph.nodes
              if n.op == "requantize" and graph.node(n.inputs[0]).op == "conv")


def _requantized(graph, x, acc):
  """The codes of `_first_requantize(graph)` fed the accumulator `acc`."""
  node = _first_requantize(graph)
  tensors = engine.run_forced(graph, x, {node.inputs[0]: acc,
                                         node.name: np.zeros(acc.shape, np.int32)})
  return np.asarray(tensors[node.name], np.int64)


def test_requantization_rounds_the_exact_product_once():
  """The default requantization is `acc * m * 2^(shift - 31)` rounded once.

  Fake quantization rounds `y / s` once, so a second rounding (gemmlowp's
  high multiply, then its rounding shift) puts a code one step off wherever
  the first lands on a half of the second; a channel that is constant (its
  BN scale near 0) repeats that at every position.
  """
  model = models.create("quickstart_cnn", num_classes=10, quant_scheme=SCHEME)
  x = _images((28, 28, 1), 2, 6)
  variables = _randomize_bn(model.init(jax.random.PRNGKey(6), x[:1]), 7)
  policy = Policy.uniform(layer_table(model, (1, 28, 28, 1)).names, 8, 8)
  calibrated = calibrate(model, variables, [x], policy)
  graph = build.build(model, calibrated, policy, x[:1])
  node = _first_requantize(graph)
  shape = engine.run(graph, x, intermediates=True)[1][node.inputs[0]].shape
  m = node.arrays["multiplier"].astype(np.int64)
  n = 31 - node.arrays["shift"].astype(np.int64)
  assert np.all((m > 0) & (n > 31))  # acc * m fits int64; a right shift
  enc = graph.encoding(node.name)
  lo, hi = (int(node.arrays[k]) for k in ("lo", "hi"))
  # Per position, 8 consecutive accumulators around a half between codes.
  p = np.arange(np.prod(shape[:-1]))[:, None]
  half = (lo + 1 + (p // 8) % (hi - lo - 1)) - enc.zero_point + 0.5
  acc = np.floor(half * 2.0**n / m).astype(np.int64) + p % 8 - 4
  acc = acc.reshape(shape)
  want = np.clip(((acc * m + (1 << (n - 1))) >> n) + enc.zero_point, lo, hi)
  got = _requantized(graph, x, acc.astype(np.int32))
  unclamped = (want > lo) & (want < hi)
  assert np.all(unclamped)
  np.testing.assert_array_equal(got, want)
  # gemmlowp's two roundings on the same accumulators: one step off at some.
  twice = build.build(model, calibrated, policy, x[:1], rounding="gemmlowp")
  got = _requantized(twice, x, acc.astype(np.int32))
  assert 0 < np.sum(got != want) and np.max(np.abs(got - want)) == 1
