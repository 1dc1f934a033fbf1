"""haqjax: hardware-aware mixed-precision quantization in JAX."""

from haqjax import nn
from haqjax import policy
from haqjax import quant
from haqjax.nn import LayerTable
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.policy import load_policy
from haqjax.policy import save_policy

__version__ = "0.1.0"
