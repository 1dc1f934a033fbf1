"""AdaRound of one layer: learned rounding of its kernel on calibration data.

`adaround_layer` sets the kernel's grid (a per-output-channel `minmax` or
`mse` range, `haqjax.quant.calibration`; symmetric signed by default),
starts the rounding logits where the soft weights equal the kernel
(`haqjax.ptq.soft_rounding`), and trains them with Adam on the layer-output
reconstruction loss (`haqjax.ptq.reconstruction`) plus the rounding
regulariser, off during a warm-up, while its exponent is annealed from 20 to
2. The result is the hard-rounded kernel, exactly on the grid, and an
`AdaRoundInfo` with the range and the losses.

Bits are traced, and the layer geometry, the iteration count and the
mini-batch size are static, so one compiled optimisation serves every layer
of the same shapes and every bit-width.

Example:
  >>> import jax
  >>> from haqjax.ptq.layer_rounding import adaround_layer
  >>> k1, k2 = jax.random.split(jax.random.key(0))
  >>> w = jax.random.normal(k1, (16, 8))
  >>> x = jax.nn.relu(jax.random.normal(k2, (256, 16)))
  >>> w_q, info = adaround_layer(jax.random.key(1), w, x, 3, iters=500)
  >>> bool(info.recon_adaround < info.recon_nearest)
  True

References:
  Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
  Quantization", ICML 2020.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from haqjax.ptq.layer_geometry import LayerGeometry
from haqjax.ptq.reconstruction import OBJECTIVES
from haqjax.ptq.reconstruction import reconstruction
from haqjax.ptq.soft_rounding import DEFAULT_SPEC
from haqjax.ptq.soft_rounding import adaround_weights
from haqjax.ptq.soft_rounding import beta_schedule
from haqjax.ptq.soft_rounding import floor_and_rest
from haqjax.ptq.soft_rounding import init_rounding
from haqjax.ptq.soft_rounding import rectified_sigmoid
from haqjax.ptq.soft_rounding import round_regularizer
from haqjax.quant import affine
from haqjax.quant import calibration
from haqjax.quant.affine import AffineSpec
from haqjax.typing import Array, ArrayLike, PRNGKey

RANGE_METHODS = ("minmax", "mse")
# Defaults measured on the quickstart CNN (W4, 1,024 images, 2-core CPU): see
# `adaround_layer`. The paper uses 10,000 iterations at learning rate 1e-3.
DEFAULT_ITERS = 2000
DEFAULT_LR = 3e-3
DEFAULT_BATCH_SIZE = 32


class AdaRoundInfo(NamedTuple):
  """What `adaround_layer` learned and measured.

  Attributes:
    loss: reconstruction loss per iteration, `[iters]` (on the mini-batch).
    reg: rounding regulariser `sum(1 - |2h - 1|^beta)` per iteration (before
      `reg_weight`; computed during the warm-up too).
    lo, hi: the kernel range behind the scale, kept dims of
      `affine.compute_range(kernel, spec)` (`StaticRange` parameters).
    scale, zero_point: the grid, same shape.
    recon_nearest, recon_adaround: reconstruction loss on all inputs with
      round-to-nearest and with the learned rounding (same range).
    flipped: fraction of weights whose code differs from round-to-nearest.
  """
  loss: Array
  reg: Array
  lo: Array
  hi: Array
  scale: Array
  zero_point: Array
  recon_nearest: Array
  recon_adaround: Array
  flipped: Array


def _grid(kernel: Array, bits: Array, spec: AffineSpec, range_method: str):
  """Range, scale and zero point of the kernel's grid."""
  lo, hi = calibration.calibrate_range(kernel, bits, spec, range_method)
  scale, zero_point = affine.compute_scale(lo, hi, bits, spec)
  return lo, hi, scale, zero_point


@functools.partial(jax.jit, static_argnames=(
    "geometry", "spec", "range_method", "iters", "batch_size", "act_fn",
    "objective"))
def _adaround(key, kernel, bias, inputs, target_inputs, bits, lr, reg_weight,
              beta_start, beta_end, warmup, *, geometry, spec, range_method,
              iters, batch_size, act_fn, objective):
  """The jitted optimisation (shapes and geometry static; bits traced)."""
  shape = kernel.shape
  lo, hi, scale, zero_point = _grid(kernel, bits, spec, range_method)
  loss = reconstruction(key, kernel, bias, inputs, target_inputs, geometry=geometry,
                        act_fn=act_fn, objective=objective, batch_size=batch_size)

  def loss_fn(v, i, beta, reg_on):
    rec = loss.batch(adaround_weights(kernel, v, scale, zero_point, bits, spec), i)
    reg = round_regularizer(rectified_sigmoid(v), beta)
    return rec + reg_on * reg_weight * reg, (rec, reg)

  opt = optax.adam(lr)
  v0 = init_rounding(kernel, scale, spec)

  def step(carry, i):
    v, opt_state = carry
    beta = beta_schedule(i, iters, warmup=warmup, beta=(beta_start, beta_end))
    reg_on = (i >= warmup * iters).astype(jnp.float32)
    grads, (rec, reg) = jax.grad(loss_fn, has_aux=True)(v, i, beta, reg_on)
    updates, opt_state = opt.update(grads, opt_state, v)
    return (optax.apply_updates(v, updates), opt_state), (rec, reg)

  (v, _), (losses, regs) = jax.lax.scan(step, (v0, opt.init(v0)), jnp.arange(iters))
  rounded = adaround_weights(kernel, v, scale, zero_point, bits, spec, hard=True)
  near_codes = affine.quantize(affine.to_groups(kernel, spec), scale, zero_point,
                               bits, dataclasses.replace(spec, rounding="nearest_even"))
  nearest = affine.from_groups(affine.dequantize(near_codes, scale, zero_point), shape)
  qmin, qmax = affine.qrange(bits, signed=spec.signed, narrow_range=spec.narrow_range)
  ada_codes = jnp.clip(floor_and_rest(kernel, scale, spec)[0]
                       + (rectified_sigmoid(v) >= 0.5) + zero_point,
                       qmin, qmax)
  info = AdaRoundInfo(
      loss=losses, reg=regs, lo=lo, hi=hi, scale=scale, zero_point=zero_point,
      recon_nearest=loss.full(nearest), recon_adaround=loss.full(rounded),
      flipped=jnp.mean((near_codes != ada_codes).astype(jnp.float32)))
  return rounded.astype(kernel.dtype), info


def _check_number(field: str, value: Any, *, low: float, high: float | None = None,
                  low_open: bool = False, allowed: str) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return  # arrays (possibly traced) are not checked
  bad = value <= low if low_open else value < low
  if bad or (high is not None and value >= high) or not math.isfinite(value):
    raise ValueError(f"{field} is {value!r}; allowed: {allowed}")


def _check_int(field: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{field} is {value!r}; allowed: a positive integer")
  return int(value)


def adaround_layer(key: PRNGKey, kernel: ArrayLike, inputs: ArrayLike,
                   bits: ArrayLike, *, layer: LayerGeometry = LayerGeometry(),
                   spec: AffineSpec = DEFAULT_SPEC, range_method: str = "minmax",
                   target_inputs: ArrayLike | None = None,
                   bias: ArrayLike | None = None, iters: int = DEFAULT_ITERS,
                   batch_size: int = DEFAULT_BATCH_SIZE, lr: ArrayLike = DEFAULT_LR,
                   reg_weight: ArrayLike = 0.01,
                   beta: tuple[ArrayLike, ArrayLike] = (20.0, 2.0),
                   warmup: ArrayLike = 0.2,
                   act_fn: Callable[[Array], Array] | None = None,
                   objective: str = "auto") -> tuple[Array, AdaRoundInfo]:
  """AdaRounds one layer's kernel to `bits` bits on calibration inputs.

  One compiled optimisation serves every call with the same kernel and input
  shapes, `layer`, `spec`, `range_method`, `iters`, `batch_size` and `act_fn`
  (pass a fixed function, not a new lambda per call); `bits`, `lr`,
  `reg_weight`, `beta` and `warmup` are traced and never recompile.

  Defaults: 2,000 steps at learning rate 3e-3 (the paper: 10,000 at 1e-3)
  binarise the rounding (the regulariser ends near 0) and, on the quickstart
  CNN at W4A32 with 1,024 calibration images (2-core CPU, 'moments'), give
  92.0% Fashion-MNIST top-1 (FP32 92.2%, round-to-nearest 89.8%) in 11-21 s
  for the whole model including compilation (91.5% against 84.6% at W3);
  10,000 steps at 1e-3 give 92.1% in ~48 s.

  Args:
    key: PRNG key for the mini-batch sampling (unused by 'moments').
    kernel: `[kh, kw, in/groups, out]` (conv) or `[in, out]` (dense).
    inputs: the layer's inputs, `[N, H, W, in]` (conv) or `[N, ..., in]`
      (dense; leading axes are flattened into examples), floating point or
      produced by already-quantized preceding layers.
    bits: weight bit-width (>= 2), a traced int.
    layer: the layer's geometry.
    spec: the weight grid and granularity (default: signed symmetric, one
      range per output channel).
    range_method: 'minmax' or 'mse' (`haqjax.quant.calibration`), static.
    target_inputs: inputs the floating-point target output is computed from
      (same shape as `inputs`); default `inputs`.
    bias: the layer's bias `[out]`, added before `act_fn`.
    iters: optimisation steps (static).
    batch_size: 'minibatch': examples per step, sampled without replacement;
      'moments': examples per accumulation chunk (static; capped at N).
    lr: Adam learning rate.
    reg_weight: lambda, the weight of the rounding regulariser.
    beta: (start, end) of the annealed regulariser exponent.
    warmup: fraction of the steps without the regulariser, in [0, 1).
    act_fn: activation applied to both outputs (None: pre-activation).
    objective: 'moments' (exact loss from second moments; no `act_fn`),
      'minibatch' (sampled with `key`), or 'auto' (moments unless `act_fn`).

  Returns:
    `(rounded_kernel, info)`: the kernel on the grid of `info.scale`, and the
    `AdaRoundInfo`.

  Raises:
    ValueError: for a bad option, or a kernel/inputs shape mismatch (one line
      naming the field).

  References:
    Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
    Quantization", ICML 2020.
  """
  iters = _check_int("iters", iters)
  batch_size = _check_int("batch_size", batch_size)
  if objective == "auto":
    objective = "moments" if act_fn is None else "minibatch"
  if objective not in OBJECTIVES or (objective == "moments" and act_fn is not None):
    raise ValueError(f"objective is {objective!r} with act_fn={act_fn!r}; allowed: "
                     "'auto', 'minibatch', or 'moments' without act_fn")
  if range_method not in RANGE_METHODS:
    raise ValueError(f"range_method is {range_method!r}; allowed: {', '.join(RANGE_METHODS)}")
  _check_number("lr", lr, low=0.0, low_open=True, allowed="a positive number")
  _check_number("reg_weight", reg_weight, low=0.0, allowed="a number >= 0")
  _check_number("warmup", warmup, low=0.0, high=1.0, allowed="a number in [0, 1)")
  if len(beta) != 2:
    raise ValueError(f"beta is {beta!r}; allowed: (start, end), two positive numbers")
  for b in beta:
    _check_number("beta", b, low=0.0, low_open=True,
                  allowed="(start, end), two positive numbers")
  kernel = jnp.asarray(kernel)
  inputs = jnp.asarray(inputs, jnp.float32)
  if layer.kind == "conv":
    if kernel.ndim != 4 or inputs.ndim != 4:
      raise ValueError(f"conv kernel has shape {kernel.shape} and inputs {inputs.shape}; "
                       "allowed: a [kh, kw, in/groups, out] kernel and [N, H, W, in] inputs")
    want = kernel.shape[2] * layer.groups
    if kernel.shape[-1] % layer.groups:
      raise ValueError(f"kernel has {kernel.shape[-1]} output channels; allowed: a "
                       f"multiple of groups={layer.groups}")
  else:
    if kernel.ndim != 2 or inputs.ndim < 2:
      raise ValueError(f"dense kernel has shape {kernel.shape} and inputs {inputs.shape}; "
                       "allowed: an [in, out] kernel and [N, ..., in] inputs")
    want = kernel.shape[0]
  if inputs.shape[-1] != want:
    raise ValueError(f"inputs have {inputs.shape[-1]} channels; allowed: {want}, the "
                     f"input channels of the {tuple(kernel.shape)} {layer.kind} kernel")
  if target_inputs is not None:
    target_inputs = jnp.asarray(target_inputs, jnp.float32)
    if target_inputs.shape != inputs.shape:
      raise ValueError(f"target_inputs have shape {target_inputs.shape}; allowed: the "
                       f"shape of inputs {inputs.shape}")
  if layer.kind == "dense":
    inputs = inputs.reshape(-1, want)
    if target_inputs is not None:
      target_inputs = target_inputs.reshape(-1, want)
  if bias is not None:
    bias = jnp.asarray(bias, jnp.float32)
    if bias.shape != (kernel.shape[-1],):
      raise ValueError(f"bias has shape {bias.shape}; allowed: ({kernel.shape[-1]},)")
  if inputs.shape[0] == 0:
    raise ValueError("inputs have no examples; allowed: at least one")
  return _adaround(
      key, kernel, bias, inputs, target_inputs, jnp.asarray(bits, jnp.int32),
      jnp.asarray(lr, jnp.float32), jnp.asarray(reg_weight, jnp.float32),
      jnp.asarray(beta[0], jnp.float32), jnp.asarray(beta[1], jnp.float32),
      jnp.asarray(warmup, jnp.float32), geometry=layer, spec=spec,
      range_method=range_method, iters=iters,
      batch_size=min(batch_size, inputs.shape[0]), act_fn=act_fn,
      objective=objective)
