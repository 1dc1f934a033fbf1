"""The HAQ actor and critic: 300-300 MLPs, a sigmoid actor output.

As in the original code, the critic adds a projection of the state and one of
the action before its first ReLU, and the last layer of both networks starts
uniformly in `[-init_w, init_w]` so that early outputs sit near the middle of
the action range (actor) and near zero (critic). Hidden layers use fan-in
uniform initialisation (Lillicrap et al. 2016, DDPG, sec. 7).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from haqjax.typing import Array


def _fan_in_uniform(key, shape, dtype=jnp.float32):
  bound = 1.0 / jnp.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _uniform(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


class Actor(nn.Module):
  """State `[..., D]` -> action `[..., A]` in (0, 1)."""
  hidden: Sequence[int]
  num_actions: int = 1
  init_w: float = 3e-3

  @nn.compact
  def __call__(self, state: Array) -> Array:
    x = state
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, kernel_init=_fan_in_uniform)(x))
    x = nn.Dense(self.num_actions, kernel_init=_uniform(self.init_w),
                 bias_init=_uniform(self.init_w))(x)
    return nn.sigmoid(x)


class Critic(nn.Module):
  """(state `[..., D]`, action `[..., A]`) -> Q value `[...]`."""
  hidden: Sequence[int]
  init_w: float = 3e-3

  @nn.compact
  def __call__(self, state: Array, action: Array) -> Array:
    x = (nn.Dense(self.hidden[0], kernel_init=_fan_in_uniform, name="state_in")(state)
         + nn.Dense(self.hidden[0], kernel_init=_fan_in_uniform, name="action_in")(action))
    x = nn.relu(x)
    for width in self.hidden[1:]:
      x = nn.relu(nn.Dense(width, kernel_init=_fan_in_uniform)(x))
    x = nn.Dense(1, kernel_init=_uniform(self.init_w), bias_init=_uniform(self.init_w))(x)
    return x[..., 0]
