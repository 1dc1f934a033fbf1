"""Integer encodings of a layer's input and kernel, from its quantizers.

The deployed grids are the fake-quant grids: scales and zero points come from
`haqjax.quant.affine` (`compute_scale`, `qrange`, `quantize`) applied to the
quantizer's own spec and range, or for LSQ from its learned step by the
arithmetic of its forward pass, so the engine follows whatever convention
the quantizer implements. Supported quantizers:

* activations, one grid per tensor:
  - `StaticRange` (`sign='auto'` is unsigned when the calibrated `lo >= 0`,
    as the quantizer decides);
  - `LSQ` without a learned offset: zero point 0, scale the step as its
    forward pass uses it (`max(step, 1e-8)` through LSQ's gradient scaling,
    which moves it by an ulp for some steps), signed `[-2^(b-1), 2^(b-1) -
    1]` or unsigned `[0, 2^b - 1]` as its `sign` (or calibrated `signed`);
  - `PACT` and `HAQActivation` (a PACT): unsigned `[0, alpha]` on `2^b`
    levels, or signed `[-alpha, alpha]` on the narrow grid, from the learned
    clip `alpha`;
* weights: `MinMaxWeight` (range from the kernel at hand; binary at 1 bit),
  `StaticRange` (a calibrated range) and signed `LSQ` without offset (its
  learned steps; binary at 1 bit), symmetric (zero point 0), per tensor or
  per output channel.

LSQ+ (`LSQ(learn_offset=True)`) is not supported: its grid `beta + k * step`
holds real zero only where `beta / step` is an integer, and the integer model
needs real zero on the grid (the zero point, which zero padding and ReLU's
zeros take); even then `round((x - beta) / step)` and `round(x / step) + zp`
round differently near ties, so the codes would not be the fake-quant ones.

`weight_codes` checks that `codes * scale` equals the quantizer's own output
bit for bit, and `act_encoding` that `dequantize(quantize(x))` on the
encoding equals the learned quantizer's output on a probe holding every code,
its ties and values beyond the range, so a quantizer this module does not
reproduce fails loudly instead of deploying another grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from haqjax.deploy.graph import Encoding
from haqjax.quant import affine
from haqjax.quant.base import Quantizer
from haqjax.quant.learned import LSQ
from haqjax.quant.learned import MIN_STEP
from haqjax.quant.learned import PACT
from haqjax.quant.learned import lsq_step
from haqjax.quant.uniform import MinMaxWeight
from haqjax.quant.uniform import StaticRange
from haqjax.typing import Array

ACT_QUANTIZERS = ("StaticRange", "LSQ", "PACT", "HAQActivation")
WEIGHT_QUANTIZERS = ("MinMaxWeight", "StaticRange", "LSQ")
# Values in an activation probe (`_check_act`), whatever the layer's shape.
_PROBE_SIZE = 4096


def _spec_for(quantizer: StaticRange, lo: np.ndarray) -> affine.AffineSpec:
  """The grid `StaticRange` uses for the range `lo`: its sign decided as it does."""
  if quantizer.sign == "auto":
    signed = not bool(np.all(lo >= 0))
  else:
    signed = quantizer.sign == "signed"
  return dataclasses.replace(quantizer.spec, signed=signed)


def _learned_signed(quantizer: LSQ | PACT, params: Any) -> bool:
  """The sign of a learned quantizer's grid: its `sign`, or the calibrated one."""
  if quantizer.sign == "auto":
    return bool(np.asarray(params["signed"]) > 0)
  return quantizer.sign == "signed"


@functools.partial(jax.jit, static_argnums=(2, 3))
def _lsq_act_step(step: Array, bits: Array, signed: bool, num_elements: int) -> Array:
  """`lsq_step` of one activation tensor, compiled once per sign and size."""
  return lsq_step(step, bits, signed=signed, num_elements=num_elements)


def _check_offset(where: str, quantizer: LSQ) -> None:
  if quantizer.learn_offset:
    raise ValueError(f"deploy: layer {where!r} has LSQ with a learned offset (LSQ+), whose "
                     "grid holds real zero only where offset / step is an integer; allowed: "
                     "LSQ without offset")


def _check_rounding(where: str, spec: affine.AffineSpec) -> None:
  if spec.rounding == "stochastic":
    raise ValueError(f"deploy: layer {where!r} rounds stochastically; allowed: "
                     "nearest_even, floor or ceil")


def _act_grid(where: str, quantizer: Quantizer, params: Any, bits: int,
              in_shape: tuple[int, ...]) -> tuple[affine.AffineSpec, np.ndarray, np.ndarray]:
  """`(spec, scale, zero_point)` of a layer's input grid (see `act_encoding`)."""
  if isinstance(quantizer, StaticRange):
    lo = np.asarray(params["lo"], np.float32)
    hi = np.asarray(params["hi"], np.float32)
    if lo.size != 1 or quantizer.spec.group_size is not None:
      raise ValueError(f"deploy: layer {where!r} has a per-channel activation range; "
                       "allowed: one range per tensor")
    spec = _spec_for(quantizer, lo)
    return (spec, *affine.compute_scale(lo.reshape(()), hi.reshape(()), bits, spec))
  if isinstance(quantizer, PACT):  # HAQActivation too.
    clip = np.maximum(np.abs(np.asarray(params["clip"], np.float32).reshape(())),
                      np.float32(MIN_STEP))
    if _learned_signed(quantizer, params):  # As `pact_fake_quant`.
      spec, lo = affine.AffineSpec(signed=True, narrow_range=True), -clip
    else:
      spec, lo = affine.AffineSpec(signed=False), np.zeros_like(clip)
    return (spec, *affine.compute_scale(lo, clip, bits, spec))
  if isinstance(quantizer, LSQ):
    _check_offset(where, quantizer)
    step = np.asarray(params["step"], np.float32)
    if step.size != 1:
      raise ValueError(f"deploy: layer {where!r} has a per-channel activation step; "
                       "allowed: one step per tensor")
    if not in_shape:
      raise ValueError(f"deploy: layer {where!r}: LSQ's step needs the input's shape")
    signed = _learned_signed(quantizer, params)
    scale = _lsq_act_step(jnp.asarray(step.reshape(())), jnp.int32(bits), signed,
                          quantizer.num_elements(tuple(in_shape)))
    return affine.AffineSpec(signed=signed), scale, np.float32(0.0)
  raise ValueError(f"deploy: layer {where!r} has activation quantizer "
                   f"{type(quantizer).__name__}; allowed: {', '.join(ACT_QUANTIZERS)} "
                   "(a range fixed by calibration, or learned)")


def act_encoding(where: str, quantizer: Quantizer, params: Any, bits: int,
                 in_shape: tuple[int, ...] = ()
                 ) -> tuple[Encoding, np.float32, affine.AffineSpec]:
  """The encoding of a layer's input codes, its float32 `1 / scale`, and its spec.

  Args:
    where: the layer name (for messages).
    quantizer: the layer's activation quantizer.
    params: its parameters (`{"lo", "hi"}`, LSQ's `step`, PACT's `clip`,
      and `signed` for a sign decided at calibration).
    bits: the policy's `a_bits` (below `FLOAT_BITS`).
    in_shape: the layer's input shape, batch axis first (LSQ's step depends
      on the number of features through its gradient scaling).

  Raises:
    ValueError: a quantizer other than those of `ACT_QUANTIZERS`, a grid per
      channel, LSQ+'s offset, stochastic rounding, a binary (signed symmetric
      1-bit) grid, or a learned quantizer whose output the encoding does
      not reproduce.
  """
  spec, scale, zero_point = _act_grid(where, quantizer, params, bits, in_shape)
  _check_rounding(where, spec)
  if spec.signed and spec.symmetric and bits <= 1:
    raise ValueError(f"deploy: layer {where!r} has binary (signed 1-bit) activations; "
                     "allowed: 2..8 bits signed, 1..8 unsigned")
  scale = np.float32(scale)
  inv = np.float32(0.0) if scale == 0 else np.float32(1.0) / scale
  enc = Encoding(bits=int(bits), signed=spec.signed, scale=scale,
                 zero_point=int(zero_point), dtype="int8" if spec.signed else "uint8",
                 symmetric=spec.symmetric, narrow_range=spec.narrow_range)
  if isinstance(quantizer, (LSQ, PACT)):
    _check_act(where, quantizer, params, enc, spec, in_shape)
  return enc, inv, spec


@functools.partial(jax.jit, static_argnums=(0, 1))
def _act_probe(quantizer: Quantizer, spec: affine.AffineSpec, params: Any, x: Array,
               scale: Array, zero_point: Array, bits: Array) -> tuple[Array, Array]:
  """The encoding's `dequantize(quantize(x))` and the quantizer's own output."""
  codes = affine.quantize(x, scale, zero_point, bits, spec)
  return affine.dequantize(codes, scale, zero_point), quantizer(params, x, bits)


def _check_act(where: str, quantizer: Quantizer, params: Any, enc: Encoding,
               spec: affine.AffineSpec, in_shape: tuple[int, ...]) -> None:
  """Raises unless the quantizer's output on a probe is the encoding's, bit for bit.

  The probe holds every code, a quarter, a half (the ties) and three
  quarters of a step above it, and values up to two steps beyond the grid,
  in a batch of `in_shape` examples (LSQ's step depends on the features).
  """
  qmin, qmax = enc.qrange
  k = np.arange(qmin - 2, qmax + 3, dtype=np.float32)[:, None]
  steps = (k + np.float32([0.0, 0.25, 0.5, 0.75])).reshape(-1)
  values = np.resize((steps - enc.zero_point) * enc.scale, _PROBE_SIZE).astype(np.float32)
  features = math.prod(in_shape[1:]) if len(in_shape) > 1 else _PROBE_SIZE
  batch = -(-_PROBE_SIZE // features)
  x = np.resize(values, (batch, *(in_shape[1:] if len(in_shape) > 1 else (features,))))
  ours, theirs = (np.asarray(a) for a in _act_probe(
      quantizer, spec, params, jnp.asarray(x), jnp.float32(enc.scale),
      jnp.float32(enc.zero_point), jnp.int32(enc.bits)))
  if not np.array_equal(ours, theirs):
    bad = int(np.sum(ours != theirs))
    raise ValueError(f"deploy: layer {where!r}: activation quantizer "
                     f"{type(quantizer).__name__} differs from its integer grid on {bad} of "
                     f"{ours.size} probe values; allowed: uniform grids")


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
  elif isinstance(quantizer, LSQ):  # Its step as its forward pass uses it; binary at 1 bit.
    scale = lsq_step(params["step"], bits, signed=spec.signed,
                     num_elements=quantizer.num_elements(kernel.shape))
    codes = affine.quantize(kernel, scale, jnp.zeros_like(scale), bits, spec)
    return codes, scale, quantizer(params, kernel, bits)
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
  elif isinstance(quantizer, LSQ):
    _check_offset(where, quantizer)
    if not _learned_signed(quantizer, params):
      raise ValueError(f"deploy: layer {where!r} has unsigned LSQ weights; allowed: signed")
    spec = affine.AffineSpec(signed=True, channel_axis=quantizer.channel_axis)
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
