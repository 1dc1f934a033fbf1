"""Model calibration: quantizer parameters from recorded layer inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax import quant
from haqjax.nn import layer_table
from haqjax.nn.calibrate import calibrate
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


def test_record_only_one_layer(digits):
  model, variables, _, images = digits
  found = record_layer_inputs(model, variables, list(images), only="conv1")
  assert list(found) == ["conv1"]
  assert found["conv1"]["inputs"].shape == (18, 8, 8, 16)
  with pytest.raises(ValueError, match="layer 'nope' is not a quantizable layer"):
    record_layer_inputs(model, variables, list(images), only="nope")
