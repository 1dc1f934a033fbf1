"""DDPG hyper-parameters, defaulting to the original HAQ code's values."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from haqjax.configs import JsonConfig

REPLAY_ACTIONS = ("proposed", "executed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDPGConfig(JsonConfig):
  """The HAQ agent's settings (Wang et al. 2019, `lib/rl/ddpg.py` defaults).

  Attributes:
    hidden: widths of the actor's and the critic's hidden layers.
    actor_lr: Adam learning rate of the actor.
    critic_lr: Adam learning rate of the critic.
    tau: soft target update rate, `target <- (1 - tau) target + tau online`.
    discount: discount of the bootstrapped critic target.
    batch_size: transitions per update, sampled uniformly (with replacement)
      from the replay buffer.
    replay_episodes: replay capacity in episodes; the ring buffer holds
      `replay_episodes * steps_per_episode` transitions (HAQ: 128 x layers).
    warmup_episodes: episodes of uniform random actions before the actor acts
      and the networks are updated.
    init_delta: exploration noise sigma at the end of the warm-up.
    delta_decay: sigma is `init_delta * delta_decay ** (episode - warmup)`.
    baseline_alpha: rate of the moving-average reward baseline subtracted in
      the critic target (HAQ's `moving_alpha`).
    init_w: the output layers are initialised uniformly in `[-init_w, init_w]`.
    replay_actions: what the replay buffer stores as each step's action.
      'proposed' (HAQ's): the agent's own action, even where the budget wall
      lowered that step's bits afterwards, so the reward of the walled policy
      is credited to actions it did not take. 'executed': the action of the
      bits the scored policy has (the centre of the bit's interval of
      `env.action_to_bits`), with each next observation's previous action
      relabelled to match, so the critic learns the value of the policies
      that were actually scored.
  """
  config_name = "DDPG config"
  # Launcher flags of fields whose own name would be ambiguous beside the
  # training config's (`haqjax.configs.flag_fields`).
  flag_names: ClassVar[dict[str, str]] = {"batch_size": "ddpg_batch_size"}

  hidden: tuple[int, ...] = (300, 300)
  actor_lr: float = 1e-4
  critic_lr: float = 1e-3
  tau: float = 0.01
  discount: float = 1.0
  batch_size: int = 64
  replay_episodes: int = 128
  warmup_episodes: int = 20
  init_delta: float = 0.5
  delta_decay: float = 0.99
  baseline_alpha: float = 0.5
  init_w: float = 3e-3
  replay_actions: str = "proposed"

  def __post_init__(self):
    hidden = tuple(self.hidden)
    if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                         for h in hidden):
      raise ValueError(f"hidden={self.hidden!r}; allowed: one or more positive "
                       "layer widths, e.g. 300,300")
    object.__setattr__(self, "hidden", hidden)
    for field in ("actor_lr", "critic_lr", "init_delta", "init_w"):
      if not getattr(self, field) > 0:
        raise ValueError(f"{field}={getattr(self, field)!r}; allowed: > 0")
    for field in ("tau", "delta_decay", "baseline_alpha"):
      if not 0 < getattr(self, field) <= 1:
        raise ValueError(f"{field}={getattr(self, field)!r}; allowed: (0, 1]")
    if not 0 <= self.discount <= 1:
      raise ValueError(f"discount={self.discount!r}; allowed: [0, 1]")
    for field in ("batch_size", "replay_episodes"):
      if getattr(self, field) < 1:
        flag = self.flag_names.get(field, field)
        raise ValueError(f"{flag}={getattr(self, field)!r}; allowed: >= 1")
    if self.replay_actions not in REPLAY_ACTIONS:
      raise ValueError(f"replay_actions={self.replay_actions!r}; allowed: "
                       f"{', '.join(REPLAY_ACTIONS)}")
    if self.warmup_episodes < 0:
      raise ValueError(f"warmup_episodes={self.warmup_episodes!r}; allowed: >= 0")
