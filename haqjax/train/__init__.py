"""FP32 training and quantization-aware training."""

from haqjax.train.checkpoint import Checkpointer
from haqjax.train.checkpoint import restore_variables
from haqjax.train.config import Config
from haqjax.train.seeds import train_and_evaluate_seeds
from haqjax.train.steps import TrainState
from haqjax.train.steps import eval_step
from haqjax.train.steps import init_state
from haqjax.train.steps import make_optimizer
from haqjax.train.steps import make_schedule
from haqjax.train.steps import train_step
from haqjax.train.trainer import resolve_policy
from haqjax.train.trainer import train_and_evaluate
from haqjax.train.writers import create_writer
