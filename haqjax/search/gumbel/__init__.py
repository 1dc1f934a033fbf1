"""Differentiable bit search: DNAS's Gumbel-softmax and EdMIPS's mixtures.

Per-layer logits over candidate bit-widths, relaxed (`relax`), trained with
the weights under a hardware-cost penalty (`supernet`: state, hyper-parameters
and the jitted step; `batch_invariant` holds the parts written so that a
vmapped member computes what one search does). `step_loop` is the resumable
step loop that one search (`single`) and a vmapped sweep of K searches
(`sweep`) share. The job around them (FP32 model, fine-tune, report) is
`haqjax.jobs.gumbel`.
"""

from haqjax.search.gumbel.config import GumbelConfig
from haqjax.search.gumbel.supernet import GumbelSearch
from haqjax.search.gumbel.supernet import GumbelState
from haqjax.search.gumbel.supernet import HParams
from haqjax.search.gumbel.supernet import candidate_rows
from haqjax.search.gumbel.supernet import candidate_tensor
from haqjax.search.gumbel.supernet import search_candidates
from haqjax.search.gumbel.supernet import widen_dominated
from haqjax.search.gumbel.relax import RELAXATIONS
from haqjax.search.gumbel.relax import temperature
