"""DDPG learning for HAQ: pure `init`, `rollout`, `update_step` and `observe`.

The agent is a `DDPG` object holding only static parts (networks, optimizers,
sizes); everything that changes, including the random key, travels in an
`AgentState` NamedTuple, so a search checkpoints and resumes it like model
state and no randomness lives on the Python side.

HAQ's recipe (Wang et al. 2019, sec. 3.4; `lib/rl/ddpg.py`):

* an episode walks the layer table; each step's action in [0, 1] becomes a
  bit-width; every transition of an episode is stored with the episode's
  final reward;
* warm-up episodes take uniform random actions and do not update;
* afterwards each stored transition is followed by one update: the critic
  regresses `r - b + discount * (1 - done) * Q'(s', mu'(s'))`, where `b` is a
  moving average of the sampled rewards, then the actor ascends
  `Q(s, mu(s))` through the freshly updated critic, then both target networks
  move by `tau`;
* exploration draws from a normal around the actor's output truncated to
  [0, 1], with sigma `init_delta * delta_decay ** (episode - warmup)`.

References:
  Lillicrap et al., "Continuous control with deep reinforcement learning",
  ICLR 2016.
  Wang, Liu, Lin, Lin & Han, "HAQ: Hardware-Aware Automated Quantization with
  Mixed Precision", CVPR 2019.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from haqjax.search.rl import replay as replay_lib
from haqjax.search.rl.config import DDPGConfig
from haqjax.search.rl.networks import Actor
from haqjax.search.rl.networks import Critic
from haqjax.typing import Array, PyTree

Transition = replay_lib.Transition


class AgentState(NamedTuple):
  """Everything a DDPG agent changes; a pytree of arrays.

  Attributes:
    actor, critic: online network parameters.
    actor_target, critic_target: target network parameters.
    actor_opt, critic_opt: Adam states.
    replay: the ring buffer.
    baseline: moving average of sampled rewards (valid when `updates > 0`).
    updates: number of updates done so far.
    key: raw uint32 PRNG key; split for every random draw, never reused.
  """
  actor: PyTree
  critic: PyTree
  actor_target: PyTree
  critic_target: PyTree
  actor_opt: PyTree
  critic_opt: PyTree
  replay: replay_lib.Replay
  baseline: Array
  updates: Array
  key: Array


class DDPG:
  """The static half of the agent: networks, optimizers and sizes.

  Example::

      agent = DDPG(DDPGConfig(), state_dim=10, steps_per_episode=14)
      state = agent.init(jax.random.PRNGKey(0))
      state, states, actions = agent.rollout(state, embedding, episode=0)
      state, metrics = agent.observe(state, transitions, update=True)
  """

  def __init__(self, config: DDPGConfig, *, state_dim: int, steps_per_episode: int,
               num_actions: int = 1):
    self.config = config
    self.state_dim = state_dim
    self.num_actions = num_actions
    self.steps_per_episode = steps_per_episode
    self.capacity = config.replay_episodes * steps_per_episode
    self.actor = Actor(config.hidden, num_actions, config.init_w)
    self.critic = Critic(config.hidden, config.init_w)
    self.actor_tx = optax.adam(config.actor_lr)
    self.critic_tx = optax.adam(config.critic_lr)
    self.rollout = jax.jit(self._rollout)
    self.observe = jax.jit(self._observe)
    self.update_step = jax.jit(self._update_step)

  def init(self, key: Array) -> AgentState:
    """Fresh networks (targets equal to them), optimizers and an empty buffer."""
    key, k_actor, k_critic = jax.random.split(key, 3)
    s = jnp.zeros((1, self.state_dim))
    a = jnp.zeros((1, self.num_actions))
    actor = self.actor.init(k_actor, s)["params"]
    critic = self.critic.init(k_critic, s, a)["params"]
    return AgentState(
        actor=actor, critic=critic, actor_target=actor, critic_target=critic,
        actor_opt=self.actor_tx.init(actor), critic_opt=self.critic_tx.init(critic),
        replay=replay_lib.init(self.capacity, self.state_dim, self.num_actions),
        baseline=jnp.zeros((), jnp.float32), updates=jnp.zeros((), jnp.int32), key=key)

  def sigma(self, episode: Array) -> Array:
    """Exploration sigma after the warm-up."""
    c = self.config
    return c.init_delta * c.delta_decay ** jnp.maximum(episode - c.warmup_episodes, 0)

  def act(self, params: PyTree, state: Array) -> Array:
    """The deterministic policy: actor output `[..., A]`."""
    return self.actor.apply({"params": params}, state)

  def _explore(self, key: Array, mu: Array, sigma: Array) -> Array:
    """A draw from N(mu, sigma^2) truncated to [0, 1]."""
    lower, upper = (0.0 - mu) / sigma, (1.0 - mu) / sigma
    z = jax.random.truncated_normal(key, lower, upper, mu.shape)
    return jnp.clip(mu + sigma * z, 0.0, 1.0)

  def _rollout(self, state: AgentState, embedding: Array, episode: Array,
               prev_action_column: int = -1) -> tuple[AgentState, Array, Array]:
    """Plays one episode over the per-step observations.

    Args:
      state: the agent.
      embedding: `[T, D]` normalised observations of the episode's steps;
        column `prev_action_column` is overwritten with the previous action
        (0 at the first step).
      episode: the episode index (warm-up below `warmup_episodes`).
      prev_action_column: where the previous action goes.

    Returns:
      `(state, observations [T, D], actions [T, A])`; the state's key moved on.
    """
    warmup = episode < self.config.warmup_episodes
    sigma = self.sigma(episode)
    key, rollout_key = jax.random.split(state.key)

    def step(prev, inputs):
      obs, k = inputs
      obs = obs.at[prev_action_column].set(prev[0])
      k_uniform, k_noise = jax.random.split(k)
      explore = self._explore(k_noise, self.act(state.actor, obs), sigma)
      random = jax.random.uniform(k_uniform, (self.num_actions,))
      action = jnp.where(warmup, random, explore)
      return action, (obs, action)

    keys = jax.random.split(rollout_key, embedding.shape[0])
    _, (obs, actions) = jax.lax.scan(
        step, jnp.zeros((self.num_actions,)), (embedding, keys))
    return state._replace(key=key), obs, actions

  def _losses(self, critic, actor, state: AgentState, batch: Transition,
              baseline: Array):
    c = self.config
    next_q = self.critic.apply(
        {"params": state.critic_target}, batch.next_state,
        self.actor.apply({"params": state.actor_target}, batch.next_state))
    target = batch.reward - baseline + c.discount * (1.0 - batch.done) * next_q
    target = jax.lax.stop_gradient(target)
    q = self.critic.apply({"params": critic}, batch.state, batch.action)
    return jnp.mean(jnp.square(q - target)), q

  def _update_step(self, state: AgentState, batch: Transition
                   ) -> tuple[AgentState, dict[str, Array]]:
    """One DDPG update on `batch` (`[B, ...]` transitions)."""
    c = self.config
    mean_reward = jnp.mean(batch.reward)
    baseline = jnp.where(state.updates > 0,
                         state.baseline + c.baseline_alpha * (mean_reward - state.baseline),
                         mean_reward)

    (critic_loss, q), critic_grads = jax.value_and_grad(
        lambda p: self._losses(p, state.actor, state, batch, baseline),
        has_aux=True)(state.critic)
    updates, critic_opt = self.critic_tx.update(critic_grads, state.critic_opt,
                                                state.critic)
    critic = optax.apply_updates(state.critic, updates)

    def actor_loss(p):
      q_pi = self.critic.apply({"params": critic}, batch.state,
                               self.actor.apply({"params": p}, batch.state))
      return -jnp.mean(q_pi)

    policy_loss, actor_grads = jax.value_and_grad(actor_loss)(state.actor)
    updates, actor_opt = self.actor_tx.update(actor_grads, state.actor_opt, state.actor)
    actor = optax.apply_updates(state.actor, updates)

    soft = lambda t, o: optax.incremental_update(o, t, c.tau)
    new = state._replace(
        actor=actor, critic=critic,
        actor_target=jax.tree.map(soft, state.actor_target, actor),
        critic_target=jax.tree.map(soft, state.critic_target, critic),
        actor_opt=actor_opt, critic_opt=critic_opt, baseline=baseline,
        updates=state.updates + 1)
    metrics = {"critic_loss": critic_loss, "policy_loss": policy_loss,
               "q_mean": jnp.mean(q), "baseline": baseline}
    return new, metrics

  def _observe(self, state: AgentState, transitions: Transition, update: Array
               ) -> tuple[AgentState, dict[str, Array]]:
    """Stores an episode's transitions `[T, ...]`, one update after each.

    Args:
      state: the agent.
      transitions: the episode, in order.
      update: bool; False during warm-up (store only).

    Returns:
      The new state and the mean of the update metrics (zeros without updates).
    """
    def step(state, item):
      state = state._replace(replay=replay_lib.add(state.replay, item))

      def do_update(state):
        key, sample_key = jax.random.split(state.key)
        batch = replay_lib.sample(sample_key, state.replay, self.config.batch_size)
        return self._update_step(state._replace(key=key), batch)

      def skip(state):
        zero = jnp.zeros((), jnp.float32)
        return state, {"critic_loss": zero, "policy_loss": zero, "q_mean": zero,
                       "baseline": state.baseline}

      return jax.lax.cond(update, do_update, skip, state)

    state, metrics = jax.lax.scan(step, state, transitions)
    return state, jax.tree.map(functools.partial(jnp.mean, axis=0), metrics)


def relabel(observations: Array, actions: Array,
            prev_action_column: int = -1) -> tuple[Array, Array]:
  """`(observations, actions)` of an episode whose actions were replaced.

  Each step's previous-action column takes the new previous action (0 at
  the first step), so a stored transition reads as if the agent had taken
  `actions` (`[T]` or `[T, A]`).
  """
  actions = jnp.asarray(actions, jnp.float32).reshape(observations.shape[0], -1)
  prev = jnp.concatenate([jnp.zeros_like(actions[:1]), actions[:-1]], axis=0)
  return observations.at[:, prev_action_column].set(prev[:, 0]), actions


def episode_transitions(observations: Array, actions: Array, reward: Array) -> Transition:
  """An episode's transitions `[T, ...]`, each with the episode's final reward."""
  t = observations.shape[0]
  next_states = jnp.concatenate([observations[1:], observations[-1:]], axis=0)
  done = jnp.zeros((t,), jnp.float32).at[-1].set(1.0)
  return Transition(state=observations, action=actions,
                    reward=jnp.full((t,), reward, jnp.float32),
                    next_state=next_states, done=done)
