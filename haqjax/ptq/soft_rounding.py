"""AdaRound's relaxation: soft rounding, its regulariser and schedule.

AdaRound (Nagel et al. 2020) replaces round-to-nearest by a learned choice,
per weight, between rounding down and up. The choice is relaxed to a
continuous variable `h(V)` in [0, 1] added to the floor of `W / s`::

    W_soft = s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z)
    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)   # zeta=1.1, gamma=-0.1
    reg = sum(1 - |2 h(V) - 1|^beta)

`V` starts where `h(V)` equals the fractional part of `W / s`, so that
`W_soft = W` inside the clip range (`init_rounding`). The regulariser pushes
each `h(V)` to 0 or 1 while `beta` is annealed (`beta_schedule`), and the
hard weights use `h(V) >= 0.5` in place of `h(V)`: exactly on the grid
(`adaround_weights(..., hard=True)`).

Example:
  >>> import jax.numpy as jnp
  >>> from haqjax.ptq import soft_rounding
  >>> h = soft_rounding.rectified_sigmoid(soft_rounding.init_logits(jnp.array([0.25])))
  >>> round(float(h[0]), 4)
  0.25

References:
  Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
  Quantization", ICML 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from haqjax.quant import affine
from haqjax.quant.affine import AffineSpec
from haqjax.typing import Array, ArrayLike

ZETA = 1.1
GAMMA = -0.1
DEFAULT_SPEC = AffineSpec(channel_axis=-1)


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


def floor_and_rest(kernel: ArrayLike, scale: ArrayLike, spec: AffineSpec
                   ) -> tuple[Array, Array]:
  """`(floor(W / s), W / s - floor(W / s))` on the grouped view of `kernel`.

  A zero scale (an all-zero range) gives 0 for both.
  """
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
  return init_logits(floor_and_rest(kernel, jnp.asarray(scale), spec)[1])


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
  base, _ = floor_and_rest(kernel, scale, spec)
  h = rectified_sigmoid(v)
  up = (h >= 0.5).astype(jnp.float32) if hard else h
  codes = jnp.clip(base + up + zero_point, qmin, qmax)
  return affine.from_groups(affine.dequantize(codes, scale, zero_point), kernel.shape)
