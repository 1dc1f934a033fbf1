"""Search settings: the budget, the bit range, the episode scoring, the agent.

One frozen dataclass, validated on creation; the launcher defines one absl
flag per field (beside the training `Config`'s), and a search saves it as
`search_config.json` in its workdir.
"""

from __future__ import annotations

import dataclasses

from haqjax.configs import JsonConfig
from haqjax.hardware import Budget
from haqjax.search.rl.config import DDPGConfig

SCORERS = ("qat", "ptq")
QUANTIZATIONS = ("linear", "kmeans")

# Fields that may differ between a search and its resumption.
RESUMABLE_CHANGES = frozenset({"search_episodes", "finetune_uniform_reference",
                               "uniform_results"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig(JsonConfig):
  """What a bit-width search looks for and how.

  Attributes:
    target: hardware target of `haqjax.hardware.get_target` ('bismo-edge',
      'bismo-cloud', 'bitfusion', 'systolic', 'table:PATH.npy').
    budget_metric: latency, cycles (or its parts compute_cycles, stall_cycles),
      energy (or its parts compute_energy, sram_energy, dram_energy), dram,
      size, kmeans_size or bitops; with quantization 'kmeans', size means
      kmeans_size (labels plus each layer's 2^b float32 centroids).
    budget: the limit: a fraction of `budget_reference` (ratio) or an amount in
      the metric's unit (absolute).
    budget_kind: 'ratio' or 'absolute'.
    budget_reference: network a ratio refers to: 'w8a8' (HAQ), 'fp32' or any
      uniform 'wXaY' (budget 1 with w4a4: "no more than uniform W4A4").
    min_bits: lowest bit-width the search may choose.
    max_bits: highest bit-width the search may choose.
    wall_order: how a policy over the budget is lowered into it: 'haq' (HAQ's
      sweep: last layer first, activations then weights, a bit each) or
      'saving' (the drop that saves the most cost per bit first, then bits
      given back while it fits; `haqjax.search.env`).
    quantization: 'linear' (weight and activation bits per layer) or 'kmeans'
      (weight bits only, k-means codebooks, float activations).
    search_episodes: episodes of the RL search (HAQ: 600).
    search_scorer: how an episode's policy is scored: 'qat' (a short
      fine-tune from the FP32 weights, then top-1 on the held-out split) or
      'ptq' (post-training quantization, then top-1 on the held-out split).
    search_finetune_steps: fine-tuning steps per episode ('qat' scorer).
    search_finetune_lr: constant SGD learning rate of those steps.
    search_val_size: held-out examples that score a policy (0: the whole
      validation split).
    finetune_epochs: the final fine-tune of the best policy, in epochs.
    finetune_learning_rate: its peak learning rate (cosine schedule).
    finetune_uniform_reference: (rl and gumbel jobs) when the budget is a
      ratio of a uniform `budget_reference` (wXaY), also fine-tune and test
      that uniform policy (fixed first/last layers applied as for the
      search's) with the final fine-tune's recipe from the same FP32 weights,
      in `uniform_reference/`, so the report compares the two; a finished one
      is reused even when this is off.
    uniform_results: a JSON file of uniform points for the report's accuracy
      vs cost plot, `{"w4a4": 90.97, ...}` (test top-1; costs from the budget
      wall) or `{"w4a4": {"test_top1": 90.97, "cost": 7.3e-05}, ...}` (cost in
      the budget metric's SI unit); unset: none.
    ddpg: HAQ's DDPG agent (`haqjax.search.rl.DDPGConfig`); its fields are
      flags of their own (`--warmup_episodes`, `--hidden=300,300`,
      `--actor_lr`, `--ddpg_batch_size`, ...).
  """
  config_name = "search config"

  target: str = "bismo-edge"
  budget_metric: str = "latency"
  budget: float = 0.5
  budget_kind: str = "ratio"
  budget_reference: str = "w8a8"
  min_bits: int = 2
  max_bits: int = 8
  wall_order: str = "haq"
  quantization: str = "linear"
  search_episodes: int = 600
  search_scorer: str = "qat"
  search_finetune_steps: int = 20
  search_finetune_lr: float = 0.01
  search_val_size: int = 0
  finetune_epochs: float = 2.0
  finetune_learning_rate: float = 0.01
  finetune_uniform_reference: bool = True
  uniform_results: str | None = None
  ddpg: DDPGConfig = dataclasses.field(default_factory=DDPGConfig)

  def __post_init__(self):
    from haqjax.search import env  # pylint: disable=g-import-not-at-top
    from haqjax.hardware import targets  # pylint: disable=g-import-not-at-top
    if not self.target.startswith("table:") and self.target not in targets.PRESETS:
      raise ValueError(f"target={self.target!r} is not allowed; allowed: "
                       f"{', '.join(targets.TARGETS)}")
    self.budget_spec()
    env.check_bit_range(self.min_bits, self.max_bits)
    env.check_wall_order(self.wall_order)
    if self.quantization not in QUANTIZATIONS:
      raise ValueError(f"quantization={self.quantization!r} is not allowed; allowed: "
                       f"{', '.join(QUANTIZATIONS)}")
    if self.search_scorer not in SCORERS:
      raise ValueError(f"search_scorer={self.search_scorer!r} is not allowed; "
                       f"allowed: {', '.join(SCORERS)}")
    for field in ("search_episodes", "finetune_epochs", "finetune_learning_rate",
                  "search_finetune_lr"):
      if not getattr(self, field) > 0:
        raise ValueError(f"{field}={getattr(self, field)!r}; allowed: > 0")
    for field in ("search_finetune_steps", "search_val_size"):
      if getattr(self, field) < 0:
        raise ValueError(f"{field}={getattr(self, field)!r}; allowed: >= 0")

  def budget_spec(self) -> Budget:
    """The budget; in k-means mode a size budget counts the codebooks (as HAQ)."""
    metric = ("kmeans_size" if self.quantization == "kmeans" and self.budget_metric == "size"
              else self.budget_metric)
    try:
      return Budget(metric=metric, value=self.budget, kind=self.budget_kind,
                    reference=self.budget_reference)
    except ValueError as e:
      msg = str(e)
      for old, new in (("Budget.metric", "budget_metric"), ("Budget.value", "budget"),
                       ("Budget.kind", "budget_kind"),
                       ("Budget.reference", "budget_reference")):
        msg = msg.replace(old, new)
      raise ValueError(msg) from None
