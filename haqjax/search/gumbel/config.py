"""Settings of the differentiable bit search (launcher mode `gumbel`).

A frozen dataclass beside `SearchConfig` (which still holds the target, the
budget, the bit range and the final fine-tune); the launcher defines one absl
flag per field, all prefixed `gumbel_`, and a search saves it as
`gumbel_config.json` in its workdir.
"""

from __future__ import annotations

import dataclasses

from haqjax.configs import JsonConfig
from haqjax.search.gumbel.derive import DERIVATIONS
from haqjax.search.gumbel.relax import RELAXATIONS

PENALTIES = ("lagrange", "hinge", "absolute")
QUANTIZER_SHARING = ("per_candidate", "shared")
CANDIDATE_SETS = ("all", "undominated")

# Fields that may differ between a search and its resumption (a finished
# search resumed with another derivation derives its policy again).
RESUMABLE_CHANGES = frozenset({"gumbel_derive"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class GumbelConfig(JsonConfig):
  """How the differentiable (DNAS / EdMIPS) bit search runs.

  Attributes:
    gumbel_bits: candidate bit-widths of weights and activations,
      comma-separated (EdMIPS: 2,3,4,5,6,8); within --min_bits..--max_bits.
    gumbel_relaxation: 'gumbel' (Gumbel-softmax samples, DNAS), 'hard'
      (straight-through Gumbel: one-hot forward, soft gradients) or
      'softmax' (the deterministic softmax mixture, EdMIPS).
    gumbel_epochs: length of the search in epochs of the training split.
    gumbel_warmup_epochs: first epochs that train the weights only (the
      logits stay at their uniform start).
    gumbel_freeze_at: epoch from which the logits are frozen and only the
      weights train (0: never).
    gumbel_tau0: initial temperature of the relaxation.
    gumbel_tau_min: final temperature; it decays exponentially from
      gumbel_tau0 over the search (after the warm-up).
    gumbel_penalty: 'lagrange' (loss + mu * (E[cost] / limit - 1), with mu
      raised by dual ascent while over budget and lowered, not below 0,
      while under), 'hinge' (loss + lambda * max(0, E[cost] / limit - 1)) or
      'absolute' (loss + lambda * |E[cost] / limit - 1|, TuNAS's absolute
      reward: a cost under the budget is penalised too, so the search spends
      it where the task loss alone would not pull bits back up).
    gumbel_derive: how the final probabilities become a policy within the
      budget: 'map' (the most probable policy that fits, an exact knapsack
      over the log-probabilities) or 'wall' (the argmax, then HAQ's budget
      wall lowers bits from the last layer up); `derive.py`.
    gumbel_lambda: the hinge's or the absolute penalty's weight, or the
      Lagrange multiplier's start.
    gumbel_dual_lr: step size of the multiplier's dual ascent per step.
    gumbel_arch_lr: Adam learning rate of the architecture logits.
    gumbel_weight_lr: constant SGD (Nesterov) learning rate of the weights.
    gumbel_quantizers: 'per_candidate' (each layer keeps a quantizer per
      candidate bit-width, calibrated at it and learned apart, as EdMIPS
      keeps one; `SoftPolicy.per_candidate`) or 'shared' (every candidate
      uses the layer's one quantizer, calibrated at the top candidate: a
      learned step then clips the low candidates' grids a few steps from
      zero).
    gumbel_candidates: 'all' (every layer searches every bit-width of
      gumbel_bits) or 'undominated' (a layer's candidate that costs no less
      than a wider one, whatever the other role's bits, takes the widest
      such one's bits: a role whose bits cost nothing holds only the top
      candidate; `supernet.widen_dominated`).
  """
  config_name = "gumbel config"
  # What a saved config without the field ran with (`stages.check_saved`).
  legacy_values = {"gumbel_quantizers": "shared"}

  gumbel_bits: str = "2,3,4,5,6,8"
  gumbel_relaxation: str = "gumbel"
  gumbel_epochs: float = 2.0
  gumbel_warmup_epochs: float = 0.25
  gumbel_freeze_at: float = 0.0
  gumbel_tau0: float = 5.0
  gumbel_tau_min: float = 0.5
  gumbel_penalty: str = "lagrange"
  gumbel_derive: str = "map"
  gumbel_lambda: float = 0.1
  gumbel_dual_lr: float = 0.1
  gumbel_arch_lr: float = 0.01
  gumbel_weight_lr: float = 0.005
  gumbel_quantizers: str = "per_candidate"
  gumbel_candidates: str = "all"

  def __post_init__(self):
    self.bits()
    if self.gumbel_relaxation not in RELAXATIONS:
      raise ValueError(f"gumbel_relaxation={self.gumbel_relaxation!r} is not allowed; "
                       f"allowed: {', '.join(RELAXATIONS)}")
    if self.gumbel_penalty not in PENALTIES:
      raise ValueError(f"gumbel_penalty={self.gumbel_penalty!r} is not allowed; "
                       f"allowed: {', '.join(PENALTIES)}")
    if self.gumbel_quantizers not in QUANTIZER_SHARING:
      raise ValueError(f"gumbel_quantizers={self.gumbel_quantizers!r} is not allowed; "
                       f"allowed: {', '.join(QUANTIZER_SHARING)}")
    if self.gumbel_candidates not in CANDIDATE_SETS:
      raise ValueError(f"gumbel_candidates={self.gumbel_candidates!r} is not allowed; "
                       f"allowed: {', '.join(CANDIDATE_SETS)}")
    if self.gumbel_derive not in DERIVATIONS:
      raise ValueError(f"gumbel_derive={self.gumbel_derive!r} is not allowed; "
                       f"allowed: {', '.join(DERIVATIONS)}")
    for field in ("gumbel_epochs", "gumbel_tau0", "gumbel_tau_min", "gumbel_arch_lr",
                  "gumbel_weight_lr"):
      if not getattr(self, field) > 0:
        raise ValueError(f"{field}={getattr(self, field)!r}; allowed: > 0")
    for field in ("gumbel_warmup_epochs", "gumbel_freeze_at", "gumbel_lambda",
                  "gumbel_dual_lr"):
      if not getattr(self, field) >= 0:
        raise ValueError(f"{field}={getattr(self, field)!r}; allowed: >= 0")
    if self.gumbel_tau_min > self.gumbel_tau0:
      raise ValueError(f"gumbel_tau_min={self.gumbel_tau_min} is larger than "
                       f"gumbel_tau0={self.gumbel_tau0}; allowed: tau_min <= tau0")
    if self.gumbel_warmup_epochs >= self.gumbel_epochs:
      raise ValueError(f"gumbel_warmup_epochs={self.gumbel_warmup_epochs} leaves no "
                       f"search in gumbel_epochs={self.gumbel_epochs}; allowed: "
                       "warm-up < epochs")

  def bits(self) -> tuple[int, ...]:
    """The candidate bit-widths, increasing."""
    allowed = ("allowed: distinct comma-separated bit-widths in 1..8, "
               "e.g. 2,3,4,5,6,8")
    try:
      bits = tuple(int(b) for b in self.gumbel_bits.split(","))
    except ValueError:
      raise ValueError(f"gumbel_bits={self.gumbel_bits!r}; {allowed}") from None
    if not all(1 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
      raise ValueError(f"gumbel_bits={self.gumbel_bits!r}; {allowed}")
    return tuple(sorted(bits))
