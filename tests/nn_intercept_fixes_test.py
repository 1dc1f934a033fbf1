"""Wrapped plain flax models in the trainer's paths: matmul quantizers, dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import init_quantizers
from haqjax.nn import layer_table
from haqjax.nn import quantized
from haqjax.policy import Policy
from haqjax.quant import MinMaxActivation
from haqjax.quant import MinMaxWeight
from haqjax.quant import QuantScheme
from haqjax.quant import StaticRange
from haqjax.train import steps
from haqjax.train import trainer

SHAPE = (4, 6, 6, 1)


class Attention(nn.Module):
  """Patch embedding, attention (matmuls qk, pv), dropout and a head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=3, padding="VALID", name="embed")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attention")(x, x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3, name="head")(x.mean(axis=1))


def _images(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=SHAPE), jnp.float32)


def _setup(scheme):
  model = quantized(Attention(), scheme)
  user = model.model.init(jax.random.key(0), _images())
  return model, user


def test_merge_variables_carries_the_matmul_operand_quantizer():
  model, user = _setup(QuantScheme(weight=MinMaxWeight(), act=StaticRange()))
  tx = optax.sgd(0.1)
  state = steps.init_state(jax.random.key(1), model, tx, SHAPE)
  assert "rhs_quant" in state.params["attention"]["qk"]
  # FP32 variables entering QAT: the quantizers (rhs_quant too) keep their init.
  merged = trainer.merge_variables(state, {"batch_stats": {}, **user}, tx, source="fp32",
                                   model="Attention")
  np.testing.assert_array_equal(merged.params["attention"]["qk"]["rhs_quant"]["hi"],
                                state.params["attention"]["qk"]["rhs_quant"]["hi"])
  np.testing.assert_array_equal(merged.params["head"]["kernel"],
                                user["params"]["head"]["kernel"])
  # Variables that have them: their values are carried.
  full = {"batch_stats": {}, **init_quantizers(model, user, _images())}
  full["params"]["attention"]["qk"]["rhs_quant"]["hi"] = jnp.full((1, 1, 1, 1), 7.0)
  merged = trainer.merge_variables(state, full, tx, source="qat", model="Attention")
  assert float(merged.params["attention"]["qk"]["rhs_quant"]["hi"].max()) == 7.0


def test_calibration_with_parameter_free_quantizers_on_a_matmul():
  model, user = _setup(QuantScheme(weight=MinMaxWeight(), act=MinMaxActivation()))
  variables = init_quantizers(model, user, _images())
  assert "qk" not in variables["params"]["attention"]  # Nothing to store.
  names = layer_table(model, SHAPE).names
  policy = Policy.uniform(names, 4, 4)
  calibrated = calibrate_lib.calibrate(model, variables, [_images(1)], policy)
  np.testing.assert_array_equal(calibrated["params"]["head"]["kernel"],
                                variables["params"]["head"]["kernel"])
  logits = model.apply(calibrated, _images(2), policy=policy, train=False)
  assert logits.shape == (4, 3) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("key", [jax.random.key(3), None], ids=["key", "no_key"])
def test_training_steps_draw_fresh_dropout_keys(key):
  model, user = _setup(QuantScheme(weight=MinMaxWeight(), act=StaticRange()))
  variables = init_quantizers(model, user, _images())
  tx = optax.sgd(0.0)  # The parameters stay: only the dropout masks differ.
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats={}, opt_state=tx.init(variables["params"]))
  batch = {"image": _images(1), "label": jnp.array([0, 1, 2, 0])}
  step = jax.jit(lambda s: steps.train_step(model, tx, s, batch, None, key=key))
  first, m0 = step(state)
  _, m0_again = step(state)
  _, m1 = step(first)
  assert float(m0["loss"]) == float(m0_again["loss"])  # Reproducible from the key.
  assert float(m0["loss"]) != float(m1["loss"])  # Step 1 draws another mask.
  k0, k1 = steps.dropout_key(key, 0), steps.dropout_key(key, 1)
  assert not np.array_equal(jax.random.key_data(k0), jax.random.key_data(k1))
  if key is not None:  # Apart from the quant stream's key of the same step.
    assert not np.array_equal(jax.random.key_data(k0),
                              jax.random.key_data(jax.random.fold_in(key, 0)))
