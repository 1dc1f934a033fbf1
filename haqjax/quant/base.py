"""The quantizer interface that every haqjax layer calls.

A quantizer is a frozen, keyword-only dataclass (its static configuration:
granularity, rounding, estimator) with three pure functions:

* `init(x)` returns the quantizer's parameters for a tensor shaped like `x`:
  an empty dict when it has none (dynamic min-max fake-quant), a step size for
  LSQ, a clip for PACT, a codebook for k-means. Shapes only: `x` may be the
  zeros a model is initialised with.
* `calibrate(params, x, bits)` returns parameters set from data (`x` is the
  real tensor: a kernel, or the activations of a few calibration batches).
  LSQ's step initialisation, PACT's initial clip, k-means' codebook and static
  activation ranges all happen here. The default keeps `params`.
* `__call__(params, x, bits, key=None)` returns the fake-quantized `x`.

`bits` is a traced integer scalar everywhere, so one compiled function serves
every bit-width; a value of `FLOAT_BITS` (32) or more returns `x` unchanged.
Quantizers whose `needs_key` is true (stochastic rounding) take a PRNG key.

Layers hold one quantizer per role (weights, input activations) and store its
parameters under `weight_quant` / `act_quant` in the `params` collection, so
learnable ones (LSQ step, PACT clip, codebooks) are trained with the model.
Parameters that must not be learned are wrapped in `stop_gradient` by the
quantizer itself.
"""

from __future__ import annotations

import abc
import dataclasses

import jax.numpy as jnp

from haqjax.policy import FLOAT_BITS
from haqjax.typing import Array, ArrayLike, PRNGKey, PyTree

# The `sign` field of quantizers whose grid may be signed or unsigned: 'auto'
# decides from the data (unsigned when nothing is negative), the others fix it.
SIGNS = ("auto", "signed", "unsigned")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantizer(abc.ABC):
  """Base class of fake quantizers with bits given at call time."""

  @property
  def needs_key(self) -> bool:
    """Whether `__call__` needs a PRNG key (stochastic rounding)."""
    return False

  def init(self, x: Array) -> PyTree:
    """Parameters for a tensor shaped like `x`; `{}` when there are none."""
    del x
    return {}

  def calibrate(self, params: PyTree, x: Array, bits: ArrayLike) -> PyTree:
    """Parameters set from the data `x` for `bits`; the default keeps them."""
    del x, bits
    return params

  @abc.abstractmethod
  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    """Fake-quantizes `x` to `bits` (traced) bits."""


def passthrough(x: Array, q: Array, bits: ArrayLike) -> Array:
  """`q` where `bits < FLOAT_BITS`, else `x` (floating point) unchanged."""
  return jnp.where(jnp.asarray(bits) >= FLOAT_BITS, x, q.astype(x.dtype))
