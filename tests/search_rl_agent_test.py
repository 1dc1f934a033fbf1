"""Tests of the DDPG agent: replay buffer, exploration, updates, traces."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.search.rl import replay as replay_lib
from haqjax.search.rl.config import DDPGConfig
from haqjax.search.rl.learning import DDPG
from haqjax.search.rl.learning import episode_transitions
from haqjax.search.rl.learning import relabel


def _agent(**kwargs):
  config = DDPGConfig(**{"hidden": (16, 16), "warmup_episodes": 1, **kwargs})
  return DDPG(config, state_dim=5, steps_per_episode=4)


def test_defaults_are_haq():
  c = DDPGConfig()
  assert c.hidden == (300, 300) and (c.actor_lr, c.critic_lr) == (1e-4, 1e-3)
  assert (c.tau, c.discount, c.batch_size, c.replay_episodes) == (0.01, 1.0, 64, 128)
  assert (c.warmup_episodes, c.init_delta, c.delta_decay, c.baseline_alpha) == (
      20, 0.5, 0.99, 0.5)
  agent = DDPG(c, state_dim=10, steps_per_episode=14)
  assert agent.capacity == 128 * 14


@pytest.mark.parametrize("kwargs, msg", [
    (dict(hidden=()), "hidden=()"), (dict(tau=0.0), "tau=0.0"),
    (dict(discount=1.5), "discount=1.5"), (dict(batch_size=0), "batch_size=0"),
    (dict(warmup_episodes=-1), "warmup_episodes=-1")])
def test_config_errors(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    DDPGConfig(**kwargs)


def test_replay_ring_buffer_wraps():
  replay = replay_lib.init(3, state_dim=2)
  for i in range(5):
    item = replay_lib.Transition(state=jnp.full(2, i, jnp.float32), action=jnp.ones(1),
                                 reward=jnp.float32(i), next_state=jnp.zeros(2),
                                 done=jnp.float32(0))
    replay = replay_lib.add(replay, item)
  assert int(replay.size) == 3 and int(replay.pointer) == 2
  np.testing.assert_array_equal(replay.data.reward, [3.0, 4.0, 2.0])
  batch = replay_lib.sample(jax.random.PRNGKey(0), replay, 100)
  assert set(np.asarray(batch.reward).tolist()) <= {2.0, 3.0, 4.0}


def test_sigma_schedule():
  agent = _agent(warmup_episodes=20)
  np.testing.assert_allclose(agent.sigma(0), 0.5)
  np.testing.assert_allclose(agent.sigma(20), 0.5)
  np.testing.assert_allclose(agent.sigma(30), 0.5 * 0.99 ** 10, rtol=1e-6)


def test_rollout_warmup_uniform_then_truncated_normal():
  agent = _agent(warmup_episodes=1)
  state = agent.init(jax.random.PRNGKey(0))
  emb = jnp.asarray(np.random.RandomState(0).rand(4, 5), jnp.float32)
  state1, obs, actions = agent.rollout(state, emb, 0)
  assert actions.shape == (4, 1) and obs.shape == (4, 5)
  assert not np.array_equal(np.asarray(state1.key), np.asarray(state.key))
  # The previous action is written into the last column.
  assert float(obs[0, -1]) == 0.0
  np.testing.assert_allclose(obs[1:, -1], actions[:-1, 0])
  np.testing.assert_allclose(obs[:, :-1], emb[:, :-1])
  # After the warm-up: actor output plus truncated noise, inside [0, 1].
  draws = []
  for ep in range(1, 200):
    state1, obs, actions = agent.rollout(state1, emb, ep)
    draws.append(np.asarray(actions))
  draws = np.concatenate(draws)
  assert draws.min() >= 0.0 and draws.max() <= 1.0
  # With sigma tiny, the action is the actor's output.
  agent2 = _agent(warmup_episodes=0, init_delta=1e-6)
  s2 = agent2.init(jax.random.PRNGKey(1))
  _, obs, actions = agent2.rollout(s2, emb, 0)
  np.testing.assert_allclose(actions, agent2.act(s2.actor, obs), atol=1e-4)


def test_update_step_matches_reference():
  agent = _agent(batch_size=4, baseline_alpha=0.5, discount=1.0, tau=0.1)
  state = agent.init(jax.random.PRNGKey(0))
  rng = np.random.RandomState(1)
  batch = replay_lib.Transition(
      state=jnp.asarray(rng.rand(4, 5), jnp.float32),
      action=jnp.asarray(rng.rand(4, 1), jnp.float32),
      reward=jnp.asarray([-1.0, -2.0, -1.0, -2.0], jnp.float32),
      next_state=jnp.asarray(rng.rand(4, 5), jnp.float32),
      done=jnp.asarray([0.0, 0.0, 0.0, 1.0], jnp.float32))
  new, metrics = agent.update_step(state, batch)
  # First update: the baseline is the batch mean.
  np.testing.assert_allclose(metrics["baseline"], -1.5)
  next_q = agent.critic.apply({"params": state.critic_target}, batch.next_state,
                              agent.actor.apply({"params": state.actor_target},
                                                batch.next_state))
  target = batch.reward + 1.5 + (1 - batch.done) * next_q
  q = agent.critic.apply({"params": state.critic}, batch.state, batch.action)
  np.testing.assert_allclose(metrics["critic_loss"], np.mean((q - target) ** 2),
                             rtol=1e-5)
  # Soft targets: target' = 0.9 target + 0.1 online'.
  jax.tree.map(lambda t_new, t_old, o: np.testing.assert_allclose(
      t_new, 0.9 * t_old + 0.1 * o, rtol=1e-5, atol=1e-7),
               new.critic_target, state.critic_target, new.critic)
  # Second update: moving average with alpha 0.5.
  batch2 = batch._replace(reward=jnp.full(4, 0.5, jnp.float32))
  _, m2 = agent.update_step(new, batch2)
  np.testing.assert_allclose(m2["baseline"], -1.5 + 0.5 * (0.5 + 1.5))


def test_actor_moves_towards_better_actions():
  # A bandit: reward is higher for larger actions; the actor's output must rise.
  agent = _agent(warmup_episodes=0, batch_size=32, actor_lr=1e-3, critic_lr=1e-2)
  state = agent.init(jax.random.PRNGKey(0))
  emb = jnp.zeros((4, 5), jnp.float32)
  before = float(agent.act(state.actor, emb[0])[0])
  for ep in range(60):
    state, obs, actions = agent.rollout(state, emb, ep)
    reward = float(jnp.mean(actions))
    state, _ = agent.observe(state, episode_transitions(obs, actions, reward), True)
  after = float(agent.act(state.actor, emb[0])[0])
  assert after > before + 0.05, (before, after)


def test_observe_traces_once_and_counts_updates():
  agent = _agent(warmup_episodes=2)
  state = agent.init(jax.random.PRNGKey(0))
  emb = jnp.zeros((4, 5), jnp.float32)
  observe = chex.assert_max_traces(agent._observe, n=1)  # pylint: disable=protected-access
  observe = jax.jit(observe)
  for ep in range(5):
    state, obs, actions = agent.rollout(state, emb, ep)
    state, _ = observe(state, episode_transitions(obs, actions, -1.0 * ep), ep >= 2)
  assert int(state.replay.size) == 20
  assert int(state.updates) == 3 * 4  # One update per stored transition after warm-up.


def test_episode_transitions():
  obs = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  tr = episode_transitions(obs, jnp.ones((3, 1)), -0.5)
  np.testing.assert_array_equal(tr.reward, [-0.5] * 3)
  np.testing.assert_array_equal(tr.done, [0, 0, 1])
  np.testing.assert_array_equal(tr.next_state[:2], obs[1:])


def test_relabel_replaces_actions_and_previous_action_column():
  obs = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  new_obs, actions = relabel(obs, jnp.asarray([0.25, 0.5, 0.75]))
  np.testing.assert_array_equal(actions[:, 0], [0.25, 0.5, 0.75])
  np.testing.assert_array_equal(new_obs[:, -1], [0.0, 0.25, 0.5])
  np.testing.assert_array_equal(new_obs[:, :-1], obs[:, :-1])


def test_replay_actions_config():
  assert DDPGConfig().replay_actions == "proposed"
  assert DDPGConfig(replay_actions="executed").replay_actions == "executed"
  with pytest.raises(ValueError, match="replay_actions='walled'; allowed: proposed, executed"):
    DDPGConfig(replay_actions="walled")
