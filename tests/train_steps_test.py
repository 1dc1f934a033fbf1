"""QAT and eval steps: one trace serves every policy, for every quantizer kind."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax import quant
from haqjax.nn import layer_table
from haqjax.nn.calibrate import calibrate
from haqjax.policy import Policy
from haqjax.train import steps

SCHEMES = {
    "dynamic": ("minmax", "dynamic"),
    "static": ("minmax", "static"),
    "lsq": ("lsq", "lsq"),
    "pact_static": ("mse", "pact"),
    "haq": ("minmax", "haq"),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_qat_and_eval_steps_trace_once_across_100_policies(scheme):
  wq, aq = SCHEMES[scheme]
  model = models.create("digits_cnn", num_classes=10, quant_scheme=quant.QuantScheme(
      weight=quant.weight_quantizer(wq), act=quant.act_quantizer(aq)))
  tx = steps.make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-4)
  state = steps.init_state(jax.random.key(0), model, tx, (1, 8, 8, 1))
  names = layer_table(model, (1, 8, 8, 1)).names
  images = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
  batch = {"image": images, "label": jnp.arange(8) % 10}
  variables = calibrate(model, state.variables(), [images], Policy.uniform(names, 4, 4))
  state = state.replace(params=variables["params"])

  traces = {"train": 0, "eval": 0}

  def counted(name, fn):
    def wrapper(*args):
      traces[name] += 1
      return fn(*args)
    return wrapper

  train_step = jax.jit(counted("train", functools.partial(steps.train_step, model, tx)))
  eval_step = jax.jit(counted("eval", functools.partial(steps.eval_step, model)))
  rng = np.random.default_rng(0)
  losses = set()
  for _ in range(100):
    policy = Policy.create(names, rng.integers(1, 9, len(names)), rng.integers(1, 9, len(names)))
    new_state, metrics = train_step(state, batch, policy)
    out = eval_step(new_state.variables(), batch, policy)
    losses.add(round(float(metrics["loss"]), 6))
    assert np.isfinite(float(out["loss"]))
  assert traces == {"train": 1, "eval": 1}
  assert len(losses) > 50  # The policies really differ.


def _stochastic_model():
  """digits_cnn whose weights and activations round stochastically."""
  return models.create("digits_cnn", num_classes=10, quant_scheme=quant.QuantScheme(
      weight=quant.MinMaxWeight(spec=quant.AffineSpec(channel_axis=-1,
                                                      rounding="stochastic")),
      act=quant.MinMaxActivation(rounding="stochastic")))


def test_stochastic_rounding_trains_with_a_new_key_each_step():
  model = _stochastic_model()
  tx = steps.make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=0.0)
  state = steps.init_state(jax.random.key(0), model, tx, (1, 8, 8, 1))
  policy = Policy.uniform(layer_table(model, (1, 8, 8, 1)).names, 2, 2)
  batch = {"image": jax.random.uniform(jax.random.key(1), (16, 8, 8, 1)),
           "label": jnp.arange(16) % 10}
  train_step = jax.jit(functools.partial(steps.train_step, model, tx,
                                         key=jax.random.key(7)))

  def loss_at(step):  # The same parameters, only the step count differs.
    return float(train_step(state.replace(step=jnp.int32(step)), batch, policy)[1]["loss"])

  assert loss_at(0) == loss_at(0)  # One key per step: a step is reproducible.
  assert len({loss_at(0), loss_at(1), loss_at(2)}) == 3  # Each step its own key.
  new_state, metrics = train_step(state, batch, policy)
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_stochastic_rounding_evaluates_deterministically():
  model = _stochastic_model()
  tx = steps.make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=0.0)
  variables = steps.init_state(jax.random.key(0), model, tx, (1, 8, 8, 1)).variables()
  policy = Policy.uniform(layer_table(model, (1, 8, 8, 1)).names, 2, 2)
  batch = {"image": jax.random.uniform(jax.random.key(1), (16, 8, 8, 1)),
           "label": jnp.arange(16) % 10}
  eval_step = jax.jit(functools.partial(steps.eval_step, model))
  first = float(eval_step(variables, batch, policy, 0)["loss"])
  assert np.isfinite(first)
  assert float(eval_step(variables, batch, policy, 0)["loss"]) == first
  assert float(eval_step(variables, batch, policy, 1)["loss"]) != first  # Per-batch noise.
