"""Differentiable bit search: DNAS's Gumbel-softmax and EdMIPS's mixtures.

Per-layer logits over candidate bit-widths, relaxed (`relax`), trained with
the weights under a hardware-cost penalty (`learning`), run and checkpointed
by `search`, and wrapped into the same job as the RL search by `runner`.
"""

from haqjax.search.gumbel.config import GumbelConfig
from haqjax.search.gumbel.learning import GumbelSearch
from haqjax.search.gumbel.learning import GumbelState
from haqjax.search.gumbel.learning import HParams
from haqjax.search.gumbel.learning import candidate_rows
from haqjax.search.gumbel.learning import candidate_tensor
from haqjax.search.gumbel.relax import RELAXATIONS
from haqjax.search.gumbel.relax import temperature
