"""Bit-width searches behind one budget API: HAQ's RL agent (`rl`)."""

from haqjax.search.config import SearchConfig
from haqjax.search.env import BudgetWall
from haqjax.search.env import Fixed
from haqjax.search.env import action_to_bits
from haqjax.search.env import actions_to_policy
from haqjax.search.env import observations
from haqjax.search.scoring import QATScorer
