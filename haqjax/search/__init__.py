"""Bit-width searches behind one budget API.

- `env`: the search space every family shares: layer observations, fixed
  layers and HAQ's budget wall (costs, limit, enforcement).
- `scoring`: a policy's accuracy signal (short QAT on a held-out split) and
  HAQ's reward.
- `rl`: HAQ's DDPG agent and its resumable episode loop (Wang et al. 2019).
- `gumbel`: the differentiable search (Gumbel-softmax / EdMIPS mixtures),
  one search or a vmapped sweep of many.

The end-to-end jobs (FP32 model, search, fine-tune, report) that run these
are in `haqjax.jobs`.
"""

from haqjax.search.config import SearchConfig
from haqjax.search.env import BudgetWall
from haqjax.search.env import Fixed
from haqjax.search.env import action_to_bits
from haqjax.search.env import actions_to_policy
from haqjax.search.env import observations
from haqjax.search.scoring import QATScorer
