"""Hessian-aware bit allocation (HAWQ-V2/V3): sensitivities, then an ILP.

- `hutchinson`: Hessian-block traces of a loss over a pytree (Hutchinson's
  estimator, forward-over-reverse Hessian-vector products, vmapped probes).
- `gauss_newton`: the same traces of the generalized Gauss-Newton matrix of
  a softmax cross-entropy (one reverse pass per probe, samples never
  negative), `--hawq_curvature=gauss_newton`.
- `sensitivity`: per-layer traces of a model's loss (kernels and inputs),
  quantization errors and the perturbation table `Omega[l, w, a]`.
- `wrapped`: the loss and trace point of a plain flax model
  (`haqjax.nn.quantized`), matmuls of two activations by both operands.
- `measure`: one sensitivity pass and its `sensitivity.json`.
- `problem`: the allocation problem on the cost table's axes (candidates,
  fixed and tied layers, the budget's limit).
- `ilp`: HAWQ-V3's integer program (scipy's HiGHS), the trace-monotone
  baseline (NNCF) and Pareto fronts over budgets.
- `greedy`: the marginal-cost greedy baseline.

The job around them (FP32 model, sensitivity pass, allocation, fine-tune,
report) is `haqjax.jobs.hawq`.
"""

from haqjax.search.hawq.config import ALLOCATORS
from haqjax.search.hawq.config import HawqConfig
from haqjax.search.hawq.ilp import Point
from haqjax.search.hawq.ilp import budget_grid
from haqjax.search.hawq.ilp import pareto_front
from haqjax.search.hawq.ilp import solve as solve_ilp
from haqjax.search.hawq.ilp import solve_monotone
from haqjax.search.hawq.greedy import solve as solve_greedy
from haqjax.search.hawq.measure import Sensitivity
from haqjax.search.hawq.measure import sensitivity_pass
from haqjax.search.hawq.measure import read_sensitivity
from haqjax.search.hawq.measure import write_sensitivity
from haqjax.search.hawq.problem import Problem
from haqjax.search.hawq.sensitivity import Traces
from haqjax.search.hawq.sensitivity import hessian_traces
from haqjax.search.hawq.sensitivity import perturbation_table
