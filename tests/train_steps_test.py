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
    "minmax": ("minmax", "minmax"),
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
