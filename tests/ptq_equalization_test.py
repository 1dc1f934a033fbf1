"""Cross-layer equalization and high-bias absorption."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.models import mobilenet
from haqjax.nn import layer_table
from haqjax.ptq import equalization as cle
from haqjax.ptq import folding
from ptq_testing import fit_bn_stats
from ptq_testing import random_variables as _random_variables


def random_variables(model, shape, seed=0):
  """BN gammas spread over ~e^(+-2) per channel, betas around 0.5."""
  return _random_variables(model, shape, lambda rng, c: {
      "scale": np.exp(rng.normal(-0.5, 1.0, c)), "bias": rng.normal(0.5, 1.0, c),
      "mean": rng.normal(0, 0.3, c), "var": rng.uniform(0.5, 2.0, c)}, seed)


def log_spread(variables, pairs):
  """Mean over pairs of log(max / min) of the first layer's output-channel ranges."""
  out = []
  for p in pairs:
    r = np.asarray(cle.channel_ranges(
        folding.get_path(variables["params"], tuple(p.first.split("/")))["kernel"]))
    out.append(np.log(r.max() / r.min()))
  return float(np.mean(out))


@pytest.fixture(scope="module")
def quickstart():
  model = models.create("quickstart_cnn", num_classes=10, width_mult=0.5)
  shape = (28, 28, 1)
  x = jax.random.normal(jax.random.key(1), (4, *shape))
  variables = fit_bn_stats(model, random_variables(model, shape), x)
  return model, variables, folding.fold_batch_norms(model, variables), x


def test_pairs_of_the_zoo():
  counts = {"digits_cnn": 2, "quickstart_cnn": 6, "mobilenet_v1": 27,
            "mobilenet_v2": 35, "resnet20": 9, "resnet18": 8, "resnet50": 32}
  for name, n in counts.items():
    assert len(cle.equalization_pairs(name)) == n, name
  pairs = cle.equalization_pairs("mobilenet_v2_small")
  assert pairs[:3] == (("stem", "block1/depthwise", "relu6"),
                       ("block1/depthwise", "block1/project", "relu6"),
                       ("block2/expand", "block2/depthwise", "relu6"))
  for model, shape in ((models.create("mobilenet_v2_small", num_classes=10,
                                      width_mult=0.35), (32, 32, 3)),
                       (models.create("resnet_small", num_classes=10, depth=8),
                        (32, 32, 3))):
    names = set(layer_table(model, (1, *shape)).names)
    assert {n for p in cle.equalization_pairs(model) for n in p[:2]} <= names
  with pytest.raises(ValueError, match="model is int"):
    cle.equalization_pairs(3)


def test_cle_keeps_relu_logits_and_evens_ranges(quickstart):
  model, _, folded, x = quickstart
  pairs = cle.equalization_pairs(model)
  out = cle.cross_layer_equalization(folded, pairs)
  apply = jax.jit(model.apply)
  ref = apply(folded, x)
  np.testing.assert_allclose(apply(out.variables, x), ref, rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(ref).max()))
  before, after = log_spread(folded, pairs), log_spread(out.variables, pairs)
  assert after < 0.5 * before, (before, after)
  assert 1 < out.passes < 100  # converged
  # After convergence each pair's two ranges agree channel by channel.
  w1 = out.variables["params"]["conv2"]["kernel"]
  w2 = out.variables["params"]["conv3"]["kernel"]
  np.testing.assert_allclose(cle.channel_ranges(w1), cle.channel_ranges(w2, axis=2),
                             rtol=1e-3)
  # The input is untouched.
  assert folded["params"]["conv2"]["kernel"] is not w1


def test_relu6_choices_on_mobilenet_v2(monkeypatch):
  model = models.create("mobilenet_v2_small", num_classes=10, width_mult=0.35)
  shape = (32, 32, 3)
  folded = folding.fold_batch_norms(model, random_variables(model, shape, seed=1))
  x = jax.random.normal(jax.random.key(2), (2, *shape))
  pairs = cle.equalization_pairs(model)
  skipped = cle.cross_layer_equalization(folded, pairs)  # every pair is ReLU6
  jax.tree.map(np.testing.assert_array_equal, skipped.variables, folded)
  as_relu = cle.cross_layer_equalization(folded, pairs, relu6="relu")
  dw = [p for p in pairs if p.first.endswith("depthwise")]
  assert log_spread(as_relu.variables, dw) < 0.5 * log_spread(folded, dw)
  # With ReLU6 kept, the clip moves to 6 * s_i: the float output changes ...
  ref = jax.jit(lambda v, x: model.apply(v, x))(folded, x)
  changed = jax.jit(lambda v, x: model.apply(v, x))(as_relu.variables, x)
  assert float(jnp.abs(changed - ref).max()) > 1e-3
  # ... and with ReLU (DFQ's replacement) CLE is exact.
  monkeypatch.setattr(mobilenet, "relu6", jax.nn.relu)
  apply_relu = jax.jit(lambda v, x: model.apply(v, x))
  ref_relu = apply_relu(folded, x)
  np.testing.assert_allclose(apply_relu(as_relu.variables, x), ref_relu, rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(ref_relu).max()))


def test_high_bias_absorption(quickstart):
  model, variables, folded, x = quickstart
  pairs = cle.equalization_pairs(model)
  stats = folding.bn_output_stats(variables)
  out = cle.cross_layer_equalization(folded, pairs, bn_stats=stats)
  # The 3-sigma rule on the rescaled statistics.
  absorbed = cle.absorb_high_bias(out.variables, pairs, out.bn_stats)
  m, sd = out.bn_stats["conv4"]
  c = np.maximum(0, m - 3 * sd)
  assert c.max() > 0
  np.testing.assert_allclose(absorbed.bn_stats["conv4"][0], m - c, rtol=1e-5, atol=1e-6)
  # conv4's bias: c4 out, conv4's kernel times c3 in.
  c3 = np.maximum(0, out.bn_stats["conv3"][0] - 3 * out.bn_stats["conv3"][1])
  w4 = out.variables["params"]["conv4"]["kernel"]
  np.testing.assert_allclose(
      absorbed.variables["params"]["conv4_bn"]["bias"],
      out.variables["params"]["conv4_bn"]["bias"] - c + np.einsum("hwio,i->o", w4, c3),
      rtol=1e-4, atol=1e-5)
  # On data matching the BN statistics, the float output barely moves when
  # no zero-padded k x k layer receives a shift (1x1 convs, dense).
  no_pad = cle.absorb_high_bias(out.variables, pairs, out.bn_stats, spatial=False)
  ref = model.apply(out.variables, x)
  drift = jnp.abs(model.apply(no_pad.variables, x) - ref).max() / jnp.abs(ref).max()
  assert float(drift) < 5e-3, float(drift)
  # Exact when every pre-activation stays above c: take c from conv5's
  # observed minimum (through GAP into the dense classifier).
  _, inter = model.apply(out.variables, x, capture_intermediates=True)
  z_min = np.asarray(inter["intermediates"]["conv5_bn"]["__call__"][0]).min(axis=(0, 1, 2))
  exact_stats = {"conv5": (jnp.asarray(z_min + 3.0), jnp.ones_like(z_min))}
  last = [p for p in pairs if p.first == "conv5"]
  moved = cle.absorb_high_bias(out.variables, last, exact_stats)
  assert np.maximum(z_min, 0).max() > 0
  ref = model.apply(out.variables, x)
  np.testing.assert_allclose(model.apply(moved.variables, x), ref, rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(ref).max()))


def test_errors(quickstart):
  model, variables, folded, _ = quickstart
  pairs = cle.equalization_pairs(model)
  with pytest.raises(ValueError, match="layer 'stem' has an unfolded BN"):
    cle.cross_layer_equalization(variables, pairs)
  with pytest.raises(ValueError, match="relu6 is 'clip'"):
    cle.cross_layer_equalization(folded, pairs, relu6="clip")
  with pytest.raises(ValueError, match="layer 'nope' is not in the variables"):
    cle.cross_layer_equalization(folded, (cle.EqualizationPair("nope", "stem", "relu"),))
  with pytest.raises(ValueError, match="does not take"):
    cle.cross_layer_equalization(folded, (cle.EqualizationPair("conv1", "conv3", "relu"),))
  with pytest.raises(ValueError, match="bn_stats has no entry for layer 'stem'"):
    cle.absorb_high_bias(folded, pairs, {})
