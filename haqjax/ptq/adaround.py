"""AdaRound: learned up-or-down rounding of weights, one layer at a time.

Rounding each weight to the nearest grid point minimises the weight error, not
the error of the layer's output. AdaRound (Nagel et al. 2020) learns, per
weight, whether to round down or up so that the quantized layer reproduces the
floating-point layer's output on calibration data::

    W_soft = s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z)
    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)   # zeta=1.1, gamma=-0.1
    loss = ||f(W x_t + b) - f(W_soft x + b)||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)

`V` starts where `h(V)` equals the fractional part of `W / s` (so `W_soft = W`
inside the clip range), is trained with Adam on the reconstruction loss over
the calibration inputs, and the regulariser, off during a warm-up, pushes each
`h(V)` to 0 or 1 while `beta` is annealed from 20 to 2. The final weights are
`s * (clip(floor(W / s) + [h(V) >= 0.5] + z, qmin, qmax) - z)`: exactly on the
grid.

The reconstruction term is summed over output channels and averaged over the
other output positions (examples, pixels), as in the authors' reference code.
`x` is the layer's input (floating point, or the output of already-quantized
preceding layers) and `x_t` the input the target is computed from (default
`x`); `f` is an optional activation (default identity: the pre-activation
output, as needed when BatchNorm follows the layer). Without an activation it is quadratic in the weights: with `W_soft = W + dW`
and `d = x - x_t` (0 when `x_t = x`), over im2col patches,

    E||W^T x_t - W_soft^T x||^2 = tr(dW^T E[x x^T] dW) + 2 tr(dW^T E[x d^T] W)
                                  + E||W^T d||^2,

so the 'moments' objective (the default then) accumulates the second moments
once over all calibration inputs and every step costs `k^2 * out` multiply-adds
(k = kh * kw * in/groups) whatever their number: the exact full-data loss,
with no mini-batch noise. With an activation the 'minibatch' objective samples
`batch_size` examples per step (the paper's procedure); on CPU, where
convolution backward passes are slow, it is tens of times slower (quickstart
CNN conv1, 200 steps of 32 images: 9.3 s against 0.25 s).
Scales come from a per-output-channel range of the kernel (`minmax` or `mse`,
`haqjax.quant.calibration`), symmetric signed by default. Bits are traced, and
the layer geometry, the iteration count and the mini-batch size are static, so
one compiled optimisation serves every layer of the same shapes and every
bit-width.

Using the result: the rounded kernels are already on the grid of the returned
range. Quantizing them again with `StaticRange(spec=spec, sign="signed")`
holding `ranges[name]` as its `{"lo", "hi"}` parameters gives them back
exactly (same scale, same codes). `MinMaxWeight` recomputes the scale from the
rounded kernel's own maximum: with `minmax` ranges that kept every code of
the quickstart CNN at W3 and W4 (values differ by float rounding only), but it is not
guaranteed (rounding may move a channel's largest weight), and after an `mse`
range, which clips, it shifts the grid (W4 top-1 92.1% with the fixed
ranges, 91.6% re-quantized by `MinMaxWeight`): use the returned ranges.

Example:
  >>> import jax
  >>> from haqjax.ptq import adaround
  >>> k1, k2 = jax.random.split(jax.random.key(0))
  >>> w = jax.random.normal(k1, (16, 8))
  >>> x = jax.nn.relu(jax.random.normal(k2, (256, 16)))
  >>> w_q, info = adaround.adaround_layer(jax.random.key(1), w, x, 3, iters=500)
  >>> bool(info.recon_adaround < info.recon_nearest)
  True

References:
  Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
  Quantization", ICML 2020.
  Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by
  Block Reconstruction", ICLR 2021 (reference implementation of AdaRound).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from haqjax.nn.calibrate import record_layer_inputs
from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.nn.layers import layer_name
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy
from haqjax.quant import affine
from haqjax.treeutil import copy_tree
from haqjax.treeutil import get_path
from haqjax.quant import calibration
from haqjax.quant.affine import AffineSpec
from haqjax.typing import Array, ArrayLike, PRNGKey, PyTree

ZETA = 1.1
GAMMA = -0.1
KINDS = ("conv", "dense")
RANGE_METHODS = ("minmax", "mse")
OBJECTIVES = ("auto", "minibatch", "moments")
DEFAULT_SPEC = AffineSpec(channel_axis=-1)
# Defaults measured on the quickstart CNN (W4, 1,024 images, 2-core CPU): see
# `adaround_layer`. The paper uses 10,000 iterations at learning rate 1e-3.
DEFAULT_ITERS = 2000
DEFAULT_LR = 3e-3
DEFAULT_BATCH_SIZE = 32
# The moment sums cancel large terms: no reduced-precision matmuls (TPU/GPU).
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerGeometry:
  """The static shape of a layer's linear map (hashable: a jit static arg).

  Attributes:
    kind: 'conv' (NHWC input, HWIO kernel `[kh, kw, in/groups, out]`) or
      'dense' (kernel `[in, out]` over the last input axis).
    strides: convolution strides `(sh, sw)` (an int is used for both).
    padding: 'SAME', 'VALID' or `((top, bottom), (left, right))`.
    groups: `feature_group_count` (the input channels for depthwise).
  """
  kind: str = "dense"
  strides: int | tuple[int, int] = (1, 1)
  padding: str | tuple[tuple[int, int], ...] = "SAME"
  groups: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind is {self.kind!r}; allowed: {', '.join(KINDS)}")
    strides = ((self.strides,) * 2 if isinstance(self.strides, numbers.Integral)
               else tuple(int(s) for s in self.strides))
    if len(strides) != 2 or min(strides) < 1:
      raise ValueError(f"strides is {self.strides!r}; allowed: a positive int or two")
    padding = self.padding if isinstance(self.padding, str) else tuple(
        tuple(int(p) for p in pair) for pair in self.padding)
    if not isinstance(self.groups, numbers.Integral) or self.groups < 1:
      raise ValueError(f"groups is {self.groups!r}; allowed: a positive integer")
    object.__setattr__(self, "strides", strides)
    object.__setattr__(self, "padding", padding)

  @classmethod
  def from_module(cls, module: nn.Module) -> LayerGeometry:
    """The geometry of a `QConv` or `QDense` instance."""
    if isinstance(module, QConv):
      return cls(kind="conv", strides=module.strides, padding=module.padding,
                 groups=module.feature_group_count)
    if isinstance(module, QDense):
      return cls(kind="dense")
    raise ValueError(f"module {type(module).__name__}; allowed: QConv or QDense")

  def apply(self, x: Array, kernel: Array) -> Array:
    """The layer's linear map of `x` (no bias)."""
    if self.kind == "dense":
      return jnp.dot(x, kernel)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=self.strides, padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups)


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


def rectified_sigmoid(v: ArrayLike) -> Array:
  """`h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`.

  The stretch past [0, 1] lets `h` reach exactly 0 and 1 with finite `V`.
  """
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_logits(rest: ArrayLike) -> Array:
  """The `V` with `rectified_sigmoid(V) == rest`, for `rest` in [0, 1].

  Args:
    rest: the fractional part `W / s - floor(W / s)`.

  Returns:
    `logit((rest - gamma) / (zeta - gamma))`, finite for every `rest` in [0, 1].
  """
  p = (jnp.asarray(rest, jnp.float32) - GAMMA) * (1.0 / (ZETA - GAMMA))
  return jnp.log(p) - jnp.log1p(-p)


def round_regularizer(h: ArrayLike, beta: ArrayLike) -> Array:
  """`sum(1 - |2h - 1|^beta)`: 0 when every `h` is 0 or 1, largest at 0.5."""
  return jnp.sum(1.0 - jnp.abs(2.0 * jnp.asarray(h) - 1.0) ** beta)


def beta_schedule(step: ArrayLike, iters: ArrayLike, *, warmup: ArrayLike = 0.2,
                  beta: tuple[ArrayLike, ArrayLike] = (20.0, 2.0)) -> Array:
  """The regulariser's exponent at `step` (0-based) of `iters`.

  `beta[0]` until `warmup * iters` steps (when the regulariser is off), then
  linear decay that would reach `beta[1]` at step `iters`:
  `end + (start - end) * (1 - (step - w) / (iters - w))`.
  """
  start, end = (jnp.asarray(b, jnp.float32) for b in beta)
  step = jnp.asarray(step, jnp.float32)
  iters = jnp.asarray(iters, jnp.float32)
  w = jnp.asarray(warmup, jnp.float32) * iters
  t = jnp.clip((step - w) / jnp.maximum(iters - w, 1.0), 0.0, 1.0)
  return end + (start - end) * (1.0 - t)


def _grid(kernel: Array, bits: Array, spec: AffineSpec, range_method: str):
  """Range, scale and zero point of the kernel's grid."""
  lo, hi = calibration.calibrate_range(kernel, bits, spec, range_method)
  scale, zero_point = affine.compute_scale(lo, hi, bits, spec)
  return lo, hi, scale, zero_point


def _split(kernel: Array, scale: Array, spec: AffineSpec) -> tuple[Array, Array]:
  """`(floor(W / s), W / s - floor(W / s))` on the grouped view."""
  v = affine.to_groups(jnp.asarray(kernel, jnp.float32), spec) * jnp.where(
      scale == 0, 0.0, 1.0 / scale)
  base = jnp.floor(v)
  return base, v - base


def init_rounding(kernel: ArrayLike, scale: ArrayLike,
                  spec: AffineSpec = DEFAULT_SPEC) -> Array:
  """The logits `V` at which the soft weights equal the kernel.

  Args:
    kernel: the floating-point kernel.
    scale: its grid's scale (kept dims of `affine.compute_range`).
    spec: granularity of `scale`.

  Returns:
    `V` shaped like the grouped view of `kernel` (the kernel's shape unless
    `spec.group_size` is set), with `rectified_sigmoid(V)` the fractional
    part of `kernel / scale`.
  """
  return init_logits(_split(kernel, jnp.asarray(scale), spec)[1])


def adaround_weights(kernel: ArrayLike, v: ArrayLike, scale: ArrayLike,
                     zero_point: ArrayLike, bits: ArrayLike,
                     spec: AffineSpec = DEFAULT_SPEC, *, hard: bool = False
                     ) -> Array:
  """Soft or hard AdaRounded weights of `kernel` for rounding logits `v`.

  Soft: `s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z)`; hard: the same
  with `h(V) >= 0.5` in place of `h(V)`, which is on the grid.

  Args:
    kernel: the floating-point kernel.
    v: rounding logits, shaped like the grouped view of `kernel`.
    scale, zero_point: the grid (kept dims of `affine.compute_range`).
    bits: bit-width (>= 2), a traced int.
    spec: grid and granularity.
    hard: round (True) or interpolate (False); static.

  Returns:
    An array shaped like `kernel`, float32.
  """
  kernel = jnp.asarray(kernel)
  scale = jnp.asarray(scale, jnp.float32)
  zero_point = jnp.asarray(zero_point, jnp.float32)
  qmin, qmax = affine.qrange(bits, signed=spec.signed, narrow_range=spec.narrow_range)
  base, _ = _split(kernel, scale, spec)
  h = rectified_sigmoid(v)
  up = (h >= 0.5).astype(jnp.float32) if hard else h
  codes = jnp.clip(base + up + zero_point, qmin, qmax)
  return affine.from_groups(affine.dequantize(codes, scale, zero_point), kernel.shape)


def _patches(x: Array, geometry: LayerGeometry, kernel_shape: Sequence[int]
             ) -> Array:
  """The rows the kernel multiplies: `[rows, groups, k]` (im2col for conv)."""
  if geometry.kind == "dense":
    return x.reshape(-1, 1, x.shape[-1])
  kh, kw, cg, _ = kernel_shape
  p = jax.lax.conv_general_dilated_patches(  # features ordered (c, kh, kw)
      x, (kh, kw), geometry.strides, geometry.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_EXACT)
  return p.reshape(-1, geometry.groups, cg * kh * kw)


def _group_kernel(w: Array, geometry: LayerGeometry) -> Array:
  """`w` as `[groups, k, out/groups]`, matching `_patches`."""
  if geometry.kind == "dense":
    return w[None]
  kh, kw, cg, cout = w.shape
  g = geometry.groups
  return jnp.transpose(w, (2, 0, 1, 3)).reshape(cg * kh * kw, g, cout // g
                                                ).transpose(1, 0, 2)


def _moments(inputs: Array, target_inputs: Array | None, geometry: LayerGeometry,
             kernel: Array, chunk: int) -> tuple[Array, Array, Array]:
  """Second moments of the patches of `x` and `d = x - x_t`, over all rows.

  Returns `(E[x x^T] [g, k, k], E[x d^T] W [g, k, out/g], E||W^T d||^2)`; the
  last two are 0 without `target_inputs`. Accumulated `chunk` examples at a
  time (zero padding rows add nothing), so memory stays at one chunk of
  patches.
  """
  n = inputs.shape[0]
  pad = -n % chunk

  def split(x):
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, chunk, *x.shape[1:])

  wg = _group_kernel(kernel, geometry)
  rows = _patches(inputs[:1], geometry, kernel.shape).shape[0] * n
  g, k = wg.shape[0], wg.shape[1]
  if target_inputs is None:
    def body(acc, x):
      p = _patches(x, geometry, kernel.shape)
      return acc + jnp.einsum("rgk,rgl->gkl", p, p, precision=_EXACT), None
    gxx, _ = jax.lax.scan(body, jnp.zeros((g, k, k)), split(inputs))
    return gxx / rows, jnp.zeros_like(wg), jnp.float32(0.0)

  def body_t(acc, xs):
    p = _patches(xs[0], geometry, kernel.shape)
    d = p - _patches(xs[1], geometry, kernel.shape)
    dw = jnp.einsum("rgk,gko->rgo", d, wg, precision=_EXACT)
    return (acc[0] + jnp.einsum("rgk,rgl->gkl", p, p, precision=_EXACT),
            acc[1] + jnp.einsum("rgk,rgo->gko", p, dw, precision=_EXACT),
            acc[2] + jnp.sum(jnp.square(dw))), None
  init = (jnp.zeros((g, k, k)), jnp.zeros_like(wg), jnp.float32(0.0))
  (gxx, b, c), _ = jax.lax.scan(body_t, init, (split(inputs), split(target_inputs)))
  return gxx / rows, b / rows, c / rows


@functools.partial(jax.jit, static_argnames=(
    "geometry", "spec", "range_method", "iters", "batch_size", "act_fn",
    "objective"))
def _adaround(key, kernel, bias, inputs, target_inputs, bits, lr, reg_weight,
              beta_start, beta_end, warmup, *, geometry, spec, range_method,
              iters, batch_size, act_fn, objective):
  """The jitted optimisation (shapes and geometry static; bits traced)."""
  shape = kernel.shape
  lo, hi, scale, zero_point = _grid(kernel, bits, spec, range_method)
  act = (lambda y: y) if act_fn is None else act_fn
  x_t_all = inputs if target_inputs is None else target_inputs

  def output(x, w):
    y = geometry.apply(x, w)
    return act(y if bias is None else y + bias)

  def recon(y_t, y):  # sum over output channels, mean over positions
    return jnp.mean(jnp.sum(jnp.square(y_t - y), axis=-1))

  if objective == "moments":
    gxx, gxd_w, c = _moments(inputs, target_inputs, geometry, kernel, batch_size)
    w_g = _group_kernel(kernel, geometry)

    def full_recon(w):  # E||W^T x_t - w^T x||^2 = E||dW^T x + W^T d||^2
      dw = _group_kernel(w, geometry) - w_g
      return (jnp.sum(dw * jnp.einsum("gkl,glo->gko", gxx, dw, precision=_EXACT))
              + 2.0 * jnp.sum(dw * gxd_w) + c)

    def batch_recon(w, i):
      del i
      return full_recon(w)
  else:
    n = inputs.shape[0]

    def full_recon(w):
      return recon(output(x_t_all, kernel), output(inputs, w))

    def batch_recon(w, i):
      rows = jax.random.choice(jax.random.fold_in(key, i), n, (batch_size,),
                               replace=False)
      y_t = jax.lax.stop_gradient(output(x_t_all[rows], kernel))
      return recon(y_t, output(inputs[rows], w))

  def loss_fn(v, i, beta, reg_on):
    rec = batch_recon(adaround_weights(kernel, v, scale, zero_point, bits, spec), i)
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
  ada_codes = jnp.clip(_split(kernel, scale, spec)[0]
                       + (rectified_sigmoid(v) >= 0.5) + zero_point,
                       qmin, qmax)
  info = AdaRoundInfo(
      loss=losses, reg=regs, lo=lo, hi=hi, scale=scale, zero_point=zero_point,
      recon_nearest=full_recon(nearest), recon_adaround=full_recon(rounded),
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


class AdaRoundResult(NamedTuple):
  """What `adaround_model` returns.

  Attributes:
    variables: the model variables with every AdaRounded layer's kernel
      replaced by its rounded kernel.
    ranges: `{layer name: {"lo": ..., "hi": ...}}` for each rounded layer,
      the `StaticRange` parameters that re-quantize its kernel exactly.
    infos: `{layer name: AdaRoundInfo}`.
    seconds: `{layer name: wall seconds of its optimisation}` (compilation
      included for the first layer of each shape).
  """
  variables: PyTree
  ranges: dict[str, dict[str, Array]]
  infos: dict[str, AdaRoundInfo]
  seconds: dict[str, float]


def layer_geometries(model: nn.Module, variables: PyTree, image: ArrayLike
                     ) -> dict[str, LayerGeometry]:
  """`{layer name: LayerGeometry}` of every QConv/QDense, in call order.

  Traces `model.apply(variables, image)` abstractly (no FLOPs).
  """
  found: dict[str, LayerGeometry] = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (QConv, QDense)):
      found[layer_name(context.module)] = LayerGeometry.from_module(context.module)
    return next_fun(*args, **kwargs)

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, jnp.asarray(image)[:1])
  return found


def adaround_model(key: PRNGKey, model: nn.Module, variables: PyTree,
                   batches: Iterable[Any], policy: Policy, *,
                   sequential: bool = False, **options: Any) -> AdaRoundResult:
  """AdaRounds every quantized layer's kernel, in forward order.

  Layers with `w_bits` of `FLOAT_BITS` (floating point) or 1 (binary, which
  has no rounding choice on the affine grid) are left unchanged and get no
  range. Activations stay in floating point here; the activation
  quantizers are calibrated separately.

  To evaluate or export the result, give each rounded layer the weight
  quantizer `StaticRange(spec=spec, sign="signed")` with parameters
  `ranges[name]` (`params[...]["weight_quant"]`); it re-quantizes the
  rounded kernel to itself at the layer's bits. With every weight bit-width
  at `FLOAT_BITS` the model runs the rounded kernels as they are.

  On the quickstart CNN (W4A32, 1,024 images, 2-core CPU) the whole call
  takes 11-21 s with the defaults; `sequential=True` took 19 s for the same
  top-1 (92.0%).

  Args:
    key: PRNG key; each layer gets its own split.
    model: the model (built from QConv/QDense).
    variables: `{"params": ..., "batch_stats": ...}` with trained weights.
    batches: calibration batches (dicts with "image" and optionally "mask",
      or image arrays); read once.
    policy: weight bits per layer.
    sequential: when true, each layer's input `x` comes from the model with
      the preceding layers already rounded (one extra floating-point pass
      over the calibration data per layer), and its target from the
      floating-point model (the paper's asymmetric reconstruction); when
      false, both are the floating-point input.
    **options: keyword options of `adaround_layer` (`spec`, `range_method`,
      `iters`, `batch_size`, `lr`, `reg_weight`, `beta`, `warmup`,
      `objective`).

  Returns:
    An `AdaRoundResult`: new variables, the per-layer ranges to hold the
    weight grid fixed (`StaticRange` parameters), and per-layer infos.

  Raises:
    ValueError: no batches, a layer missing from the policy, or a bad option.

  References:
    Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
    Quantization", ICML 2020.
  """
  for name in ("layer", "target_inputs", "bias", "act_fn"):
    if name in options:
      raise ValueError(f"option {name!r} is set per layer by adaround_model; "
                       "allowed: options of adaround_layer other than it")
  images = []
  for batch in batches:
    x = batch["image"] if isinstance(batch, dict) else batch
    if isinstance(batch, dict) and batch.get("mask") is not None:
      x = np.asarray(x)[np.asarray(batch["mask"], bool)]
    images.append(np.asarray(x))
  if not images:
    raise ValueError("calibration batches are empty; allowed: at least one batch")
  recorded = record_layer_inputs(model, variables, images)
  geometries = layer_geometries(model, variables, images[0])
  params = copy_tree(variables["params"])
  new_vars = {**variables, "params": params}
  ranges: dict[str, dict[str, Array]] = {}
  infos: dict[str, AdaRoundInfo] = {}
  seconds: dict[str, float] = {}
  names = list(recorded)
  keys = jax.random.split(key, len(names))
  for i, name in enumerate(names):
    w_bits = int(np.asarray(policy.bits_for(name)[0]))
    if w_bits >= FLOAT_BITS or w_bits <= 1:
      continue
    entry = recorded[name]
    layer_params = get_path(params, entry["path"])
    inputs = entry["inputs"]
    if sequential and ranges:  # inputs through the already-rounded layers
      inputs = record_layer_inputs(model, new_vars, images, only=name)[name]["inputs"]
    t0 = time.perf_counter()
    rounded, info = adaround_layer(
        keys[i], layer_params["kernel"], inputs, w_bits, layer=geometries[name],
        target_inputs=entry["inputs"] if sequential else None, **options)
    jax.block_until_ready(rounded)
    seconds[name] = round(time.perf_counter() - t0, 3)
    layer_params["kernel"] = rounded
    ranges[name] = {"lo": info.lo, "hi": info.hi}
    infos[name] = info
  return AdaRoundResult(variables=new_vars, ranges=ranges, infos=infos, seconds=seconds)
