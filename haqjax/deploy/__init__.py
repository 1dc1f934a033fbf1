"""Integer deployment: a model and a policy as an integer network.

`graph` is the model-independent integer graph (its module docstring gives
every op's exact semantics); `build` lowers a haqjax model to it; `engine`
runs it with integer arithmetic; `agreement` compares it with the
fake-quantized model.
"""

from haqjax.deploy.graph import DTYPES
from haqjax.deploy.graph import OPS
from haqjax.deploy.graph import WIDE_CAPACITY
from haqjax.deploy.graph import Encoding
from haqjax.deploy.graph import Graph
from haqjax.deploy.graph import Node
