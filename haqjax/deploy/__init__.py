"""Integer deployment: a model and a policy as an integer network::

    graph = haqjax.deploy.build.build(model, variables, policy, images[:1])
    logits = haqjax.deploy.engine.run(graph, images)

`graph` is the model-independent integer graph (its module docstring gives
every op's exact semantics); `build` lowers a haqjax model to it (through
`capture`, `layers`, `quantizers`); `engine` runs it with integer arithmetic
(`fixed_point` holds the gemmlowp requantization); `agreement` compares it
with the fake-quantized model and measures its accuracy.
"""

from haqjax.deploy.agreement import CodeAgreement
from haqjax.deploy.agreement import compare_codes
from haqjax.deploy.agreement import compare_logits
from haqjax.deploy.agreement import evaluate
from haqjax.deploy.graph import DTYPES
from haqjax.deploy.graph import OPS
from haqjax.deploy.graph import ROUNDINGS
from haqjax.deploy.graph import WIDE_CAPACITY
from haqjax.deploy.graph import Encoding
from haqjax.deploy.graph import Graph
from haqjax.deploy.graph import Node
