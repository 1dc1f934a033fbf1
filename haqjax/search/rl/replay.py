"""A replay ring buffer held as fixed-size arrays (jit- and checkpoint-friendly)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from haqjax.typing import Array


class Transition(NamedTuple):
  """One step, or a batch `[B, ...]` of steps."""
  state: Array       # [D]
  action: Array      # [A]
  reward: Array      # []
  next_state: Array  # [D]
  done: Array        # [] 1.0 on an episode's last step


class Replay(NamedTuple):
  """`capacity` transitions; `size` of them valid; the next write at `pointer`."""
  data: Transition   # leaves [C, ...]
  size: Array        # int32 []
  pointer: Array     # int32 []


def init(capacity: int, state_dim: int, num_actions: int = 1) -> Replay:
  """An empty buffer."""
  zeros = lambda *s: jnp.zeros((capacity, *s), jnp.float32)
  data = Transition(state=zeros(state_dim), action=zeros(num_actions), reward=zeros(),
                    next_state=zeros(state_dim), done=zeros())
  return Replay(data=data, size=jnp.zeros((), jnp.int32),
                pointer=jnp.zeros((), jnp.int32))


def add(replay: Replay, item: Transition) -> Replay:
  """Writes one transition, overwriting the oldest when full."""
  capacity = replay.data.reward.shape[0]
  data = jax.tree.map(lambda buf, x: buf.at[replay.pointer].set(x), replay.data, item)
  return Replay(data=data, size=jnp.minimum(replay.size + 1, capacity),
                pointer=(replay.pointer + 1) % capacity)


def sample(key: Array, replay: Replay, batch_size: int) -> Transition:
  """`batch_size` transitions drawn uniformly with replacement from the valid ones."""
  idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(replay.size, 1))
  return jax.tree.map(lambda buf: buf[idx], replay.data)
