"""The user's own model, quantized, costed and searched from Python in a few lines.

::

    import haqjax
    result = haqjax.search_policy(model, variables, (x_train, y_train), (x_val, y_val),
                                  test=(x_test, y_test), target="bismo-edge",
                                  metric="latency", budget="w4a4", method="gumbel")
    print(result.summary())

- `search_policy` (`haqjax.api.search`): a per-layer bit policy under a
  hardware budget by the Gumbel, RL or HAWQ search, fine-tuned and scored,
  with uniform reference points; returns a `SearchResult` (`result`).
- `sweep` (`haqjax.api.sweeps`): K policies at once, one per budget (and
  other swept search settings), as one vmapped Gumbel search, each
  fine-tuned and scored; returns a `SweepResult` (`sweep_result`).
- `quantize`, `calibrate`, `finetune`, `evaluate` (`haqjax.api.training`):
  the steps one at a time, on numpy arrays, batches or a haqjax `Split`.

The model is a plain `flax.linen` model (wrapped by `haqjax.nn.quantized`)
or one built from haqjax layers; the data go through
`haqjax.data.as_split`. These names are also `haqjax.search_policy`,
`haqjax.sweep`, `haqjax.quantize`, ..., imported on first use.
"""

from haqjax.api.result import SearchResult
from haqjax.api.search import search_policy
from haqjax.api.sweep_result import SweepResult
from haqjax.api.sweeps import sweep
from haqjax.api.training import calibrate
from haqjax.api.training import evaluate
from haqjax.api.training import finetune
from haqjax.api.training import quantize
