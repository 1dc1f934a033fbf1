"""haqjax: hardware-aware mixed-precision quantization in JAX.

The few-line API on the user's own model (`haqjax.api`) is imported on
first use, so `import haqjax` stays light::

    result = haqjax.search_policy(model, variables, train, val, target="bismo-edge",
                                  budget="w4a4")
"""

from haqjax import nn
from haqjax import policy
from haqjax import quant
from haqjax.nn import LayerTable
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.policy import load_policy
from haqjax.policy import save_policy

__version__ = "0.1.0"

# Names of `haqjax.api` offered here, imported when first used.
_API = ("SearchResult", "SweepResult", "calibrate", "evaluate", "finetune", "quantize",
        "search_policy", "sweep")


def __getattr__(name: str):
  if name in _API:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module("haqjax.api"), name)
  raise AttributeError(f"module 'haqjax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_API))
