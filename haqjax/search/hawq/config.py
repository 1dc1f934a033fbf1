"""Settings of the Hessian-aware bit allocation (launcher mode `hawq`).

A frozen dataclass beside `SearchConfig` (which holds the target, the
budget, the bit range and the final fine-tune); the launcher defines one
absl flag per field, all prefixed `hawq_`, and a job saves it as
`hawq_config.json` in its workdir.
"""

from __future__ import annotations

import dataclasses

from haqjax.configs import JsonConfig

ALLOCATORS = ("ilp", "greedy", "monotone")
# What the sensitivity pass takes the traces of (`sensitivity.hessian_traces`).
CURVATURES = ("hessian", "gauss_newton")
# Over what the quantization noise counts as isotropic (`sensitivity`'s module doc).
GRANULARITIES = ("channel", "tensor")

# Fields that may differ between a job and its resumption.
RESUMABLE_CHANGES = frozenset()


@dataclasses.dataclass(frozen=True, kw_only=True)
class HawqConfig(JsonConfig):
  """How the sensitivities are measured and the bits allocated.

  Attributes:
    hawq_bits: candidate bit-widths of weights and activations,
      comma-separated (HAWQ-V3: 4,8); empty: every width in
      --min_bits..--max_bits.
    hawq_curvature: 'gauss_newton' (the generalized Gauss-Newton matrix:
      positive semi-definite, so no layer's trace comes out negative from
      noise; one reverse pass per probe; on the quickstart CNN 1/100 or
      less of the Hessian's variance per probe for layer inputs, 1/2 to
      1/20 for kernels, and the same ILP policies;
      `haqjax.search.hawq.gauss_newton`) or 'hessian' (HAWQ-V2/V3's and
      PyHessian's: Hutchinson's estimator on the loss's Hessian,
      forward-over-reverse products).
    hawq_granularity: 'channel' (traces and errors per channel, summed:
      a channel with large curvature but no error, such as a dead ReLU
      channel before a BatchNorm of zero variance, adds nothing) or
      'tensor' (HAWQ-V2/V3's: one trace times the tensor's mean squared
      error, which on MobileNetV2 charged such channels' curvature to
      every bit-width of the depthwise inputs).
    hawq_probes: probes per iteration and batch, evaluated together (vmap);
      memory grows with it.
    hawq_tolerance: the estimate stops once every layer's trace has a
      standard error (from the probes' spread) of at most this fraction of
      its value; 0 runs all iterations. 0.1, the trace to one part in ten,
      took 4 Gauss-Newton iterations on the quickstart CNN and gave the
      ILP the policies of 13; the Hessian's per-probe variance is 10-100x
      larger, so it reaches the cap first.
    hawq_max_iterations: cap on the estimator's iterations. On 2 CPU cores
      one iteration of the quickstart CNN (8 probes on 2 batches of 128)
      takes about 9 s (measured with the CPU shared).
    hawq_batches: training batches (of --batch_size) the loss is averaged
      over, for the traces and the activation errors.
    hawq_allocator: 'ilp' (HAWQ-V3's integer program, optimal for the
      table), 'greedy' (lower the bit of least sensitivity per cost saved
      until the budget holds) or 'monotone' (NNCF: the best allocation in
      which more sensitive layers never get fewer bits).
  """
  config_name = "hawq config"

  hawq_bits: str = ""
  hawq_curvature: str = "gauss_newton"
  hawq_granularity: str = "channel"
  hawq_probes: int = 8
  hawq_tolerance: float = 0.1
  hawq_max_iterations: int = 30
  hawq_batches: int = 2
  hawq_allocator: str = "ilp"

  def __post_init__(self):
    if self.hawq_bits:
      self.bits(1, 8)
    if self.hawq_curvature not in CURVATURES:
      raise ValueError(f"hawq_curvature={self.hawq_curvature!r} is not allowed; "
                       f"allowed: {', '.join(CURVATURES)}")
    if self.hawq_granularity not in GRANULARITIES:
      raise ValueError(f"hawq_granularity={self.hawq_granularity!r} is not allowed; "
                       f"allowed: {', '.join(GRANULARITIES)}")
    if self.hawq_allocator not in ALLOCATORS:
      raise ValueError(f"hawq_allocator={self.hawq_allocator!r} is not allowed; "
                       f"allowed: {', '.join(ALLOCATORS)}")
    for field in ("hawq_probes", "hawq_max_iterations", "hawq_batches"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}={value!r}; allowed: an integer >= 1")
    if not self.hawq_tolerance >= 0:
      raise ValueError(f"hawq_tolerance={self.hawq_tolerance!r}; allowed: >= 0")

  def bits(self, min_bits: int, max_bits: int) -> tuple[int, ...]:
    """The candidate bit-widths, increasing, within `min_bits..max_bits`."""
    if not self.hawq_bits:
      return tuple(range(min_bits, max_bits + 1))
    allowed = ("allowed: distinct comma-separated bit-widths in "
               f"{min_bits}..{max_bits}, e.g. 4,8")
    try:
      bits = tuple(int(b) for b in self.hawq_bits.split(","))
    except ValueError:
      raise ValueError(f"hawq_bits={self.hawq_bits!r}; {allowed}") from None
    if not all(min_bits <= b <= max_bits for b in bits) or len(set(bits)) != len(bits):
      raise ValueError(f"hawq_bits={self.hawq_bits!r}; {allowed}")
    return tuple(sorted(bits))
