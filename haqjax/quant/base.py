"""The quantizer interface that every haqjax layer calls.

A quantizer is a frozen dataclass (static configuration: granularity, rounding,
estimator) with two pure functions:

* `init(x)` returns the quantizer's learnable parameters for a tensor like `x`
  (an empty dict when it has none, e.g. min-max fake-quant; a step size for
  LSQ; a clip value for PACT);
* `__call__(params, x, bits)` returns the fake-quantized `x`. `bits` is a traced
  integer scalar, so the same compiled function serves every bit-width. A value
  of `FLOAT_BITS` or more returns `x` unchanged.

Layers hold one quantizer per role (weights, input activations) as static
attributes and create its parameters under `<role>_quant`.
"""

from __future__ import annotations

import abc
import dataclasses

from haqjax.typing import Array, ArrayLike, PyTree


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantizer(abc.ABC):
  """Base class of fake quantizers with bits given at call time."""

  def init(self, x: Array) -> PyTree:
    """Learnable parameters for a tensor like `x`; `{}` when there are none."""
    del x
    return {}

  @abc.abstractmethod
  def __call__(self, params: PyTree, x: Array, bits: ArrayLike) -> Array:
    """Fake-quantizes `x` to `bits` (traced) bits."""
