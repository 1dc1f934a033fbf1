"""The HAQ search loop: episodes, rewards, checkpoints, logs.

`run(problem, scorer, directory)` plays `episodes` episodes of the DDPG agent
over the layer table, enforces the budget on each proposed policy, scores it,
stores the episode and updates the agent. After every episode the whole
search state (agent, replay buffer, episode counter, best policy, key) and
the per-episode records are checkpointed with orbax, synchronously, so a
process killed at any point loses at most the episode it was playing; the
same call then resumes from the last finished episode, and with the same seed
ends with the same best policy as an uninterrupted search.

Outputs in `directory`: `checkpoints/`, `episodes.jsonl` (one record per
finished episode, rewritten from the checkpoint on resume), `metrics.jsonl`
and TensorBoard scalars.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from haqjax import io as haq_io
from haqjax.policy import Policy
from haqjax.search import env as env_lib
from haqjax.search import scoring
from haqjax.search.rl import learning
from haqjax.search.rl.config import DDPGConfig
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import writers



@dataclasses.dataclass(frozen=True)
class Problem:
  """What the agent searches over.

  Attributes:
    names: layer names, table order.
    observations: `[T, D]` per-step observations (`env.observations`).
    mode: 'linear' or 'kmeans'.
    min_bits, max_bits: the action range.
    wall: costs and the budget (fixed layers included).
    fp32_top1: top-1 of the floating-point model on the scoring split.
    episodes: how many episodes in all.
    ddpg: agent settings.
    seed: the agent's seed.
  """
  names: tuple[str, ...]
  observations: np.ndarray
  mode: str
  min_bits: int
  max_bits: int
  wall: env_lib.BudgetWall
  fp32_top1: float
  episodes: int
  ddpg: DDPGConfig
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Result:
  """The best policy found and the search's records."""
  policy: Policy
  best: dict[str, Any]
  records: list[dict[str, Any]]
  seconds: float
  trace_counts: dict[str, int]


def run(problem: Problem, scorer: Callable[[Policy], dict[str, float]], directory: str,
        *, progress: bool = False, tensorboard: bool = True) -> Result:
  """Runs (or resumes) the search; see the module docstring.

  Args:
    problem: the search space, budget and agent settings.
    scorer: policy -> metrics with "top1" (percent) on the held-out split.
    directory: where the search writes; a rerun resumes from it.
    progress: show a progress bar.
    tensorboard: also write TensorBoard scalars.

  Returns:
    The best policy (highest reward) and every episode's record.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  agent = learning.DDPG(problem.ddpg, state_dim=problem.observations.shape[1],
                        steps_per_episode=problem.observations.shape[0])
  embedding = jnp.asarray(problem.observations)
  state = agent.init(jax.random.PRNGKey(problem.seed))
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=2)
  records: list[dict[str, Any]] = []
  best: dict[str, Any] = {"reward": -math.inf}
  if checkpointer.latest_step() is not None:
    restored, meta = checkpointer.restore({"agent": state})
    state = learning.AgentState(*restored["agent"])
    records, best = list(meta["records"]), dict(meta["best"])
  episodes_path = os.path.join(directory, "episodes.jsonl")
  haq_io.write_jsonl(episodes_path, records)  # Exactly the checkpointed episodes.
  writer = writers.create_writer(directory, tensorboard=tensorboard)
  start = len(records)
  bar = tqdm.tqdm(total=problem.episodes, initial=start, disable=not progress,
                  desc="HAQ search", unit="episode", dynamic_ncols=True)
  wall = problem.wall
  t_start = time.perf_counter()
  try:
    for episode in range(start, problem.episodes):
      t0 = time.perf_counter()
      warmup = episode < problem.ddpg.warmup_episodes
      state, obs, actions = agent.rollout(state, embedding, episode)
      w, a = env_lib.actions_to_policy(
          np.asarray(actions), problem.names, mode=problem.mode,
          min_bits=problem.min_bits, max_bits=problem.max_bits)
      w, a = wall.enforce(w, a)
      policy = Policy.create(problem.names, w, a)
      metrics = scorer(policy)
      reward = scoring.reward(metrics["top1"], problem.fp32_top1)
      if problem.ddpg.replay_actions == "executed":
        obs, actions = learning.relabel(obs, env_lib.policy_to_actions(
            w, a, mode=problem.mode, min_bits=problem.min_bits,
            max_bits=problem.max_bits), env_lib.PREV_ACTION_COLUMN)
      transitions = learning.episode_transitions(obs, actions, reward)
      state, agent_metrics = agent.observe(state, transitions, not warmup)
      cost = wall.describe(w, a)
      record = {
          "episode": episode, "reward": reward, "top1": float(metrics["top1"]),
          "loss": float(metrics.get("loss", float("nan"))),
          "cost": cost["cost"], "cost_ratio": cost["ratio"], "limit": cost["limit"],
          "warmup": warmup, "sigma": float(agent.sigma(episode)),
          "w_bits": [int(b) for b in w], "a_bits": [int(b) for b in a],
          **{k: float(v) for k, v in jax.device_get(agent_metrics).items()},
      }
      if reward > best["reward"]:
        best = {"reward": reward, "episode": episode, "top1": record["top1"],
                "cost": cost["cost"], "cost_ratio": cost["ratio"],
                "w_bits": record["w_bits"], "a_bits": record["a_bits"]}
      record["best_reward"] = best["reward"]
      record["seconds"] = time.perf_counter() - t0
      records.append(record)
      checkpointer.save(episode, {"agent": state}, {"records": records, "best": best})
      checkpointer.wait()
      haq_io.append_jsonl(episodes_path, [record])
      writer.write_scalars(episode, {
          "search/reward": reward, "search/top1": record["top1"],
          "search/cost": record["cost"], "search/cost_ratio": record["cost_ratio"],
          "search/best_reward": best["reward"], "search/sigma": record["sigma"],
          "search/critic_loss": record["critic_loss"],
          "search/seconds": record["seconds"]})
      bar.update(1)
      bar.set_postfix(best=f"{best['reward']:+.3f}", top1=f"{best['top1']:.2f}",
                      cost=f"{best['cost_ratio']:.3f}x")
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  if not records:
    raise ValueError("search_episodes is 0; allowed: >= 1")
  policy = Policy.create(problem.names, best["w_bits"], best["a_bits"])
  counts = scorer.trace_counts() if hasattr(scorer, "trace_counts") else {}
  return Result(policy=policy, best=best, records=records,
                seconds=time.perf_counter() - t_start, trace_counts=counts)
