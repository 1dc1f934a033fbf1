"""Shared helpers of the PTQ tests: random variables and fitted BN statistics."""

import jax
import jax.numpy as jnp
import numpy as np

from haqjax import models


def random_variables(model, shape, bn_values, seed=0):
  """Variables of `model` drawn with numpy (faster than `model.init` on CPU).

  Kernels are He-normal; every other leaf (BN scale, bias, mean, var; layer
  biases) is `bn_values(rng, c)[leaf name]` when present, else zeros.
  """
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])),
                                    leaf.shape), jnp.float32)
    c = leaf.shape[0]
    value = bn_values(rng, c).get(name.split("'")[-2], np.zeros(c))
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def fit_bn_stats(model, variables, x):
  """Running statistics equal to the batch statistics of `x` (one train step).

  A train-mode call moves each running average by `(1 - momentum)` towards
  the batch statistics; solving for those gives BNs whose outputs on `x` are
  exactly `N(beta, gamma^2)` per channel, as after training.
  """
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  m = models.cnn.BN_MOMENTUM
  stats = jax.tree.map(lambda new, old: (new - m * old) / (1 - m),
                       updates["batch_stats"], variables["batch_stats"])
  return {**variables, "batch_stats": stats}
