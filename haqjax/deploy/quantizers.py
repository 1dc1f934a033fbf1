"""Integer encodings of a layer's input and kernel, from its quantizers.

The deployed grids are the fake-quant grids: scales and zero points come from
`haqjax.quant.affine` (`compute_scale`, `qrange`, `quantize`) applied to the
quantizer's own spec and range, so the engine follows whatever convention
`affine` implements. Supported quantizers:

* activations: `StaticRange` per tensor (`sign='auto'` is unsigned when the
  calibrated `lo >= 0`, as the quantizer decides);
* weights: `MinMaxWeight` (range from the kernel at hand; binary at 1 bit)
  and `StaticRange` (a calibrated range), symmetric (zero point 0), per
  tensor or per output channel.

`weight_codes` checks that `codes * scale` equals the quantizer's own output
bit for bit, so a quantizer this module does not reproduce fails loudly
instead of deploying other weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from haqjax.deploy.graph import Encoding
from haqjax.quant import affine
from haqjax.quant.base import Quantizer
from haqjax.quant.uniform import MinMaxWeight
from haqjax.quant.uniform import StaticRange
from haqjax.typing import Array

ACT_QUANTIZERS = ("StaticRange",)
WEIGHT_QUANTIZERS = ("MinMaxWeight", "StaticRange")


def _spec_for(quantizer: StaticRange, lo: np.ndarray) -> affine.AffineSpec:
  """The grid `StaticRange` uses for the range `lo`: its sign decided as it does."""
  if quantizer.sign == "auto":
    signed = not bool(np.all(lo >= 0))
  else:
    signed = quantizer.sign == "signed"
  return dataclasses.replace(quantizer.spec, signed=signed)


def _check_rounding(where: str, spec: affine.AffineSpec) -> None:
  if spec.rounding == "stochastic":
    raise ValueError(f"deploy: layer {where!r} rounds stochastically; allowed: "
                     "nearest_even, floor or ceil")


def act_encoding(where: str, quantizer: Quantizer, params: Any, bits: int
                 ) -> tuple[Encoding, np.float32, affine.AffineSpec]:
  """The encoding of a layer's input codes, its float32 `1 / scale`, and its spec.

  Args:
    where: the layer name (for messages).
    quantizer: the layer's activation quantizer.
    params: its parameters (`{"lo", "hi"}`).
    bits: the policy's `a_bits` (below `FLOAT_BITS`).

  Raises:
    ValueError: a quantizer other than a per-tensor `StaticRange`, stochastic
      rounding, or a binary (signed symmetric 1-bit) grid.
  """
  if not isinstance(quantizer, StaticRange):
    raise ValueError(f"deploy: layer {where!r} has activation quantizer "
                     f"{type(quantizer).__name__}; allowed: {', '.join(ACT_QUANTIZERS)} "
                     "(a range fixed by calibration)")
  lo = np.asarray(params["lo"], np.float32)
  hi = np.asarray(params["hi"], np.float32)
  if lo.size != 1 or quantizer.spec.group_size is not None:
    raise ValueError(f"deploy: layer {where!r} has a per-channel activation range; "
                     "allowed: one range per tensor")
  spec = _spec_for(quantizer, lo)
  _check_rounding(where, spec)
  if spec.signed and spec.symmetric and bits <= 1:
    raise ValueError(f"deploy: layer {where!r} has binary (signed 1-bit) activations; "
                     "allowed: 2..8 bits signed, 1..8 unsigned")
  scale, zero_point = affine.compute_scale(lo.reshape(()), hi.reshape(()), bits, spec)
  scale = np.float32(scale)
  inv = np.float32(0.0) if scale == 0 else np.float32(1.0) / scale
  enc = Encoding(bits=int(bits), signed=spec.signed, scale=scale,
                 zero_point=int(zero_point), dtype="int8" if spec.signed else "uint8",
                 symmetric=spec.symmetric, narrow_range=spec.narrow_range)
  return enc, inv, spec


@functools.partial(jax.jit, static_argnums=(0, 1))
def _weight_grid(quantizer: Quantizer, spec: affine.AffineSpec, params: Any, kernel: Array,
                 bits: Array) -> tuple[Array, Array, Array]:
  """`(codes, scale, quantizer output)` of `kernel`, one compilation per shape."""
  if isinstance(quantizer, MinMaxWeight):
    lo, hi = affine.compute_range(kernel, spec)
    if spec.signed and spec.symmetric:  # Binary at 1 bit: scale mean|w| (XNOR-Net).
      mean_abs = jnp.mean(jnp.abs(kernel), axis=affine.reduce_axes(kernel.ndim, spec),
                          keepdims=True)
      lo = jnp.where(bits <= 1, -mean_abs, lo)
      hi = jnp.where(bits <= 1, mean_abs, hi)
  else:
    lo, hi = params["lo"], params["hi"]
  scale, zero_point = affine.compute_scale(lo, hi, bits, spec)
  codes = affine.quantize(kernel, scale, zero_point, bits, spec)
  return codes, scale, quantizer(params, kernel, bits)


def weight_codes(where: str, quantizer: Quantizer, params: Any, kernel: np.ndarray,
                 bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-output-channel codes (int8, shaped as `kernel`) and scales (`[C]`).

  Args:
    where: the layer name (for messages).
    quantizer: the layer's weight quantizer.
    params: its parameters.
    kernel: the kernel it quantizes (BN-folded for a folded layer), `[..., C]`.
    bits: the policy's `w_bits` (below `FLOAT_BITS`).

  Raises:
    ValueError: an unsupported quantizer or spec, or codes that do not
      reproduce the quantizer's output.
  """
  kernel = np.asarray(kernel, np.float32)
  if isinstance(quantizer, MinMaxWeight):
    spec = quantizer.spec
  elif isinstance(quantizer, StaticRange):
    spec = _spec_for(quantizer, np.asarray(params["lo"]))
  else:
    raise ValueError(f"deploy: layer {where!r} has weight quantizer "
                     f"{type(quantizer).__name__}; allowed: {', '.join(WEIGHT_QUANTIZERS)}")
  _check_rounding(where, spec)
  per_channel = spec.channel_axes in ((), (-1,), (kernel.ndim - 1,))
  if not spec.symmetric or spec.group_size is not None or not per_channel:
    raise ValueError(f"deploy: layer {where!r} quantizes weights with {spec}; allowed: "
                     "symmetric, per tensor or per output channel (axis -1)")
  codes, scale, expected = (np.asarray(a) for a in _weight_grid(
      quantizer, spec, params, jnp.asarray(kernel), jnp.int32(bits)))
  if not np.array_equal(codes * scale, expected):
    raise ValueError(f"deploy: layer {where!r}: weight quantizer {type(quantizer).__name__} "
                     "does not give codes * scale; allowed: uniform grids")
  scale = np.broadcast_to(scale.reshape(-1) if scale.size > 1 else scale.reshape(()),
                          kernel.shape[-1:]).astype(np.float32)
  codes = np.where(scale == 0, 0, codes)  # A zero channel: codes 0 (binary gives +-1).
  return codes.astype(np.int8), scale
