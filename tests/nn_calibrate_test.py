"""Model calibration: quantizer parameters from recorded layer inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax import quant
from haqjax.nn import layer_table
from haqjax.nn.calibrate import calibrate
from haqjax.nn.calibrate import calibrator
from haqjax.nn.calibrate import record_layer_inputs
from haqjax.policy import Policy


@pytest.fixture(scope="module")
def digits():
  scheme = quant.QuantScheme(
      weight=quant.LSQ(channel_axis=-1), act=quant.StaticRange(method="minmax"),
      rules=(quant.QuantRule(pattern="classifier", act=quant.PACT(sign="auto")),))
  model = models.create("digits_cnn", num_classes=10, quant_scheme=scheme)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  names = layer_table(model, (1, 8, 8, 1)).names
  images = jax.random.uniform(jax.random.key(1), (3, 6, 8, 8, 1))
  return model, variables, names, images


def test_records_every_layer_input_and_drops_masked_rows(digits):
  model, variables, names, images = digits
  batches = [{"image": images[0], "mask": np.array([1, 1, 1, 1, 0, 0], bool)},
             {"image": images[1], "mask": np.ones(6, bool)}]
  found = record_layer_inputs(model, variables, batches)
  assert list(found) == list(names)
  assert found["stem"]["inputs"].shape == (10, 8, 8, 1)
  np.testing.assert_array_equal(found["stem"]["inputs"][:4], images[0][:4])
  assert isinstance(found["classifier"]["quantizers"][1], quant.PACT)


def test_calibrate_sets_ranges_steps_and_clips(digits):
  model, variables, names, images = digits
  policy = Policy.uniform(names, 4, 4)
  out = calibrate(model, variables, list(images), policy)
  stem = out["params"]["stem"]
  np.testing.assert_allclose(stem["act_quant"]["hi"], jnp.max(images), rtol=1e-6)
  np.testing.assert_allclose(stem["act_quant"]["lo"], jnp.min(images), rtol=1e-6)
  kernel = stem["kernel"]
  np.testing.assert_allclose(
      stem["weight_quant"]["step"].ravel(),
      2 * jnp.mean(jnp.abs(kernel), axis=(0, 1, 2)) / np.sqrt(7), rtol=1e-6)
  found = record_layer_inputs(model, variables, list(images))
  np.testing.assert_allclose(out["params"]["classifier"]["act_quant"]["clip"],
                             np.abs(found["classifier"]["inputs"]).max(), rtol=1e-6)
  # The untouched parts are the same arrays.
  np.testing.assert_array_equal(out["params"]["stem"]["kernel"], kernel)
  logits = model.apply(out, images[0], policy=policy, train=False)
  assert np.all(np.isfinite(logits))


def test_calibration_errors(digits):
  model, variables, names, images = digits
  policy = Policy.uniform(names, 4, 4)
  with pytest.raises(ValueError, match="calibration batches are empty"):
    calibrate(model, variables, [], policy)
  bad = images[0].at[0, 0, 0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="input of layer 'stem' has non-finite"):
    calibrate(model, variables, [bad], policy)
  # The last layer's kernel: an earlier one would make later inputs non-finite.
  classifier = variables["params"]["classifier"]
  params = {**variables["params"], "classifier": {
      **classifier, "kernel": classifier["kernel"].at[0, 0].set(jnp.inf)}}
  with pytest.raises(ValueError, match="kernel of layer 'classifier' has non-finite"):
    calibrate(model, {**variables, "params": params}, [images[0]], policy)


def test_record_only_one_layer(digits):
  model, variables, _, images = digits
  found = record_layer_inputs(model, variables, list(images), only="conv1")
  assert list(found) == ["conv1"]
  assert found["conv1"]["inputs"].shape == (18, 8, 8, 16)
  with pytest.raises(ValueError, match="layer 'nope' is not a quantizable layer"):
    record_layer_inputs(model, variables, list(images), only="nope")


def test_calibration_traces_once_across_calls_and_policies():
  """Two policies, the first one twice: the model runs in Python once (the
  recording's trace) and the quantizer calibration is traced once, bits as data."""
  scheme = quant.QuantScheme(
      weight=quant.LSQ(channel_axis=-1), act=quant.PACT(sign="unsigned"),
      rules=(quant.QuantRule(pattern="classifier", weight=quant.KMeansWeight(iters=5),
                             act=quant.StaticRange(sign="unsigned", method="mse")),))
  # num_classes=7: a model no other test calibrates, so nothing is compiled yet.
  model = models.create("digits_cnn", num_classes=7, quant_scheme=scheme)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  names = layer_table(model, (1, 8, 8, 1)).names
  images = list(jax.random.uniform(jax.random.key(1), (2, 6, 8, 8, 1)))
  w4a4 = Policy.uniform(names, 4, 4)
  w2a8 = Policy.create(names, [2, 3, 2], [8, 6, 8])
  model_runs = []

  def count_model_runs(next_fun, args, kwargs, context):
    if context.module.scope.path == () and context.method_name == "__call__":
      model_runs.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(count_model_runs):
    first = calibrate(model, variables, images, w4a4)
    other = calibrate(model, variables, images, w2a8)
    again = calibrate(model, variables, images, w4a4)
  assert len(model_runs) == 1
  assert calibrator(model).trace_counts() == {"record": 1, "calibrate": 1}
  # The bits reached the compiled calibration: other bits, other parameters.
  jax.tree.map(np.testing.assert_array_equal, again, first)
  for layer in names:
    for role in ("weight_quant", "act_quant"):
      a, b = first["params"][layer][role], other["params"][layer][role]
      if layer != "classifier" and role == "act_quant":
        continue  # PACT's clip is the data's maximum, for any bits.
      assert any(not np.array_equal(a[k], b[k]) for k in a), (layer, role)
  # The compiled calibration computes what the quantizer computes eagerly, up
  # to the order of the n-term sum in LSQ's mean |w| (at most (n - 1) * 2^-24
  # relative for non-negative terms) and a few roundings.
  kernel = variables["params"]["conv1"]["kernel"]
  want = scheme.weight.calibrate(variables["params"]["conv1"]["weight_quant"], kernel, 3)
  n = int(np.prod(kernel.shape[:-1]))
  np.testing.assert_allclose(other["params"]["conv1"]["weight_quant"]["step"],
                             want["step"], rtol=(n + 8) * 2.0 ** -24)
