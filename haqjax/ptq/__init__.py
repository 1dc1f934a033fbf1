"""Post-training quantization: folding, equalization, bias correction, AdaRound.

::

    result = haqjax.ptq.ptq(key, model, variables, batches, policy,
                            haqjax.ptq.PTQOptions(adaround=True))

`ptq` runs the whole flow (`haqjax.ptq.pipeline`), `PTQScorer` scores many
policies with the policy-independent steps done once, and
`ptq_and_evaluate(config, workdir)` is the launcher's `ptq` mode. Each step
is also a function of its own module.
"""

from haqjax.ptq.adaround import adaround_model
from haqjax.ptq.bias_correction import analytic_bias_correction
from haqjax.ptq.bias_correction import empirical_bias_correction
from haqjax.ptq.equalization import absorb_high_bias
from haqjax.ptq.equalization import cross_layer_equalization
from haqjax.ptq.folding import fold_batch_norms
from haqjax.ptq.pipeline import PTQOptions
from haqjax.ptq.pipeline import PTQResult
from haqjax.ptq.pipeline import PTQScorer
from haqjax.ptq.pipeline import ptq
from haqjax.ptq.runner import ptq_and_evaluate
