"""What the HAQ search stores in its replay buffer: proposed or executed actions."""

import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.nn import layer_table
from haqjax.search import env
from haqjax.search.rl import learning
from haqjax.search.rl import search
from haqjax.search.rl.config import DDPGConfig


def _problem(replay_actions):
  table = layer_table(models.create("quickstart_cnn", num_classes=10), (1, 28, 28, 1))
  wall = env.BudgetWall(hardware.get_target("bismo-edge"), hardware.from_layer_table(table),
                        hardware.Budget(metric="latency", value=0.5), min_bits=2,
                        max_bits=8, fixed=env.Fixed.create(len(table), mode="linear"))
  ddpg = DDPGConfig(hidden=(16, 16), batch_size=8, warmup_episodes=2,
                    replay_actions=replay_actions)
  return search.Problem(names=table.names, observations=env.observations(table),
                        mode="linear", min_bits=2, max_bits=8, wall=wall, fp32_top1=90.0,
                        episodes=4, ddpg=ddpg)


def _stored(problem, tmp_path, monkeypatch):
  """Runs the search; returns its records and each episode's stored (obs, actions)."""
  stored = []
  original = learning.episode_transitions

  def spy(obs, actions, reward):
    stored.append((np.asarray(obs), np.asarray(actions).reshape(-1)))
    return original(obs, actions, reward)

  monkeypatch.setattr(learning, "episode_transitions", spy)
  scorer = lambda policy: {"top1": 80.0 + float(np.mean(policy.w_bits))}
  result = search.run(problem, scorer, str(tmp_path), tensorboard=False)
  return result.records, stored


@pytest.mark.parametrize("replay_actions", ["proposed", "executed"])
def test_replay_stores_the_configured_actions(replay_actions, tmp_path, monkeypatch):
  problem = _problem(replay_actions)
  records, stored = _stored(problem, tmp_path, monkeypatch)
  assert len(stored) == problem.episodes
  walled = 0
  for record, (obs, actions) in zip(records, stored):
    executed = env.policy_to_actions(record["w_bits"], record["a_bits"], mode="linear",
                                     min_bits=2, max_bits=8)
    w, a = env.actions_to_policy(actions, problem.names, mode="linear", min_bits=2,
                                 max_bits=8)
    # Each step's previous-action column holds the stored previous action.
    np.testing.assert_allclose(obs[1:, env.PREV_ACTION_COLUMN], actions[:-1], rtol=1e-6)
    assert obs[0, env.PREV_ACTION_COLUMN] == 0.0
    if replay_actions == "executed":
      np.testing.assert_allclose(actions, executed, rtol=1e-6)
    else:
      walled += not (np.array_equal(w, record["w_bits"]) and
                     np.array_equal(a, record["a_bits"]))
  if replay_actions == "proposed":
    # Half of W8A8's latency: the wall lowers the random warm-up policies.
    assert walled >= 1
