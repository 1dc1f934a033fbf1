"""HAQ's DDPG agent and search loop (Wang et al., CVPR 2019)."""

from haqjax.search.rl.config import DDPGConfig
from haqjax.search.rl.learning import DDPG
from haqjax.search.rl.learning import AgentState
from haqjax.search.rl.learning import episode_transitions
from haqjax.search.rl.replay import Replay
from haqjax.search.rl.replay import Transition
from haqjax.search.rl.search import Problem
from haqjax.search.rl.search import Result
from haqjax.search.rl.search import run
