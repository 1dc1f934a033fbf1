"""Quantizers that learn their range: LSQ, LSQ+, PACT and HAQ's activations.

Each keeps its range as a learnable parameter (trained with the model by the
same optimizer, without weight decay) and computes its gradient by autodiff
through a forward pass written so that the gradient is the paper's:

* LSQ (Esser et al. 2020): `x_hat = round(clip(x / s, -Qn, Qp)) * s` with the
  rounding straight-through; the step gradient is `-x/s + round(x/s)` inside
  the range and `-Qn` / `Qp` outside, scaled by `g = 1 / sqrt(N * Qp)`.
  Step initialisation `2 * mean|x| / sqrt(Qp)` (the paper's), or with
  `step_init='mse'` the step of least squared quantization error on the
  calibration data (LSQ+'s initialisation, without its offset). The
  forward pass uses `max(|s|, MIN_STEP)` (as NNCF does with its scales): an SGD step that
  carries `s` past zero leaves a working quantizer whose gradient still
  flows, where `max(s, MIN_STEP)` would freeze it at the floor, every input
  on the grid's last level and the layer's output constant.
* LSQ+ (Bhalgat et al. 2020): LSQ with a learned offset `beta`,
  `x_hat = round(clip((x - beta) / s, -Qn, Qp)) * s + beta`, initialised from
  the min/max so that `[min, max]` spans the grid.
* PACT (Choi et al. 2018): `y = clip(x, 0, alpha)` quantized on `[0, alpha]`
  with the STE, so `d x_hat / d alpha = 1[x >= alpha]`; `|alpha|` is used,
  as LSQ's `|s|`.
* HAQ's activation quantizer (Wang et al. 2019, the released code): a
  learnable clip initialised to 6, unsigned on `[0, r]` after ReLU and signed
  on `[-r, r]` elsewhere (one bit of the budget goes to the sign), gradient as
  PACT's on both sides.

References:
  Esser et al., "Learned Step Size Quantization", ICLR 2020.
  Bhalgat et al., "LSQ+: Improving low-bit quantization through learnable
    offsets and better initialization", CVPR Workshops 2020.
  Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural
    Networks", arXiv:1805.06085, 2018.
  Wang et al., "HAQ: Hardware-Aware Automated Quantization with Mixed
    Precision", CVPR 2019.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from haqjax.quant import affine
from haqjax.quant import calibration
from haqjax.quant.base import SIGNS
from haqjax.quant.base import Quantizer
from haqjax.quant.base import passthrough
from haqjax.quant.estimators import ste
from haqjax.typing import Array, ArrayLike, PRNGKey, PyTree

MIN_STEP = 1e-8
# LSQ's step initialisations: the paper's `2 mean|x| / sqrt(Qp)`, least squared error.
LSQ_INITS = ("mean", "mse")


def grad_scale(x: Array, scale: ArrayLike) -> Array:
  """`x` forward, gradient multiplied by `scale` backward (LSQ's `g`)."""
  scaled = x * scale
  return jax.lax.stop_gradient(x - scaled) + scaled


def round_ste(x: Array) -> Array:
  """Round to nearest even forward, identity backward."""
  return ste(x, jnp.round(x))


def lsq_bounds(bits: ArrayLike, signed: bool) -> tuple[Array, Array]:
  """LSQ's `(Qn, Qp)`: the grid is `[-Qn, Qp]` (both as positive floats)."""
  qmin, qmax = affine.qrange(bits, signed=signed)
  return -qmin, qmax


def _lsq_gradient_scale(qp: Array, num_elements: int) -> Array:
  """LSQ's `g = 1 / sqrt(N * Qp)` (`Qp` at least 1)."""
  return jax.lax.rsqrt(num_elements * jnp.maximum(qp, 1.0))


def lsq_step(step: Array, bits: ArrayLike, *, signed: bool, num_elements: int) -> Array:
  """The step LSQ's forward pass multiplies by: `max(|step|, MIN_STEP)` through `grad_scale`.

  The gradient scaling leaves the value but can move it by an ulp, so an
  integer grid of LSQ's (`haqjax.deploy`) takes this step, not the stored one.
  """
  _, qp = lsq_bounds(jnp.asarray(bits, jnp.int32), signed)
  return grad_scale(jnp.maximum(jnp.abs(step), MIN_STEP),
                    _lsq_gradient_scale(qp, num_elements))


def lsq_fake_quant(x: Array, step: Array, bits: ArrayLike, *, signed: bool,
                   num_elements: int, offset: Array | None = None) -> Array:
  """LSQ (or, with `offset`, LSQ+) fake-quant with the paper's gradients.

  Args:
    x: the tensor.
    step: the step size `s` (broadcasts against `x`; per tensor or channel).
    bits: traced bit-width (1..8). A signed 1-bit grid is binary:
      `sign(x - beta) * s`.
    signed: grid `[-2^(b-1), 2^(b-1) - 1]`, else `[0, 2^b - 1]`.
    num_elements: `N` in the gradient scale `1 / sqrt(N * Qp)`: the weights
      per step for weights, the features per example for activations.
    offset: LSQ+'s learned offset `beta`, or None.

  Returns:
    The fake-quantized tensor.
  """
  bits = jnp.asarray(bits, jnp.int32)
  qn, qp = lsq_bounds(bits, signed)
  g = _lsq_gradient_scale(qp, num_elements)
  s = lsq_step(step, bits, signed=signed, num_elements=num_elements)
  beta = 0.0 if offset is None else grad_scale(offset, g)
  v = (x - beta) * (1.0 / s)
  binary = signed  # a signed 1-bit grid has no zero: use {-1, +1}
  q = round_ste(jnp.clip(v, -qn, qp))
  if binary:
    sign = ste(jnp.clip(v, -1.0, 1.0), jnp.where(v >= 0, 1.0, -1.0))
    q = jnp.where(bits <= 1, sign, q)
  return q * s + beta


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSQ(Quantizer):
  """Learned step size quantization (LSQ), or LSQ+ with `learn_offset`.

  Attributes:
    sign: 'signed' (weights), 'unsigned' (activations after ReLU) or 'auto'
      (decided at calibration from the data's minimum and kept as a
      non-learned parameter).
    channel_axis: one step per index of this axis (e.g. -1 for per-output-
      channel weight steps); None for one step per tensor (the paper).
    batch_axis: for activations, the batch axis (0); `N` of the gradient scale
      then counts the features of one example. None for weights.
    learn_offset: LSQ+: also learn an offset `beta`.
    step_init: the initial step `calibrate` sets without an offset: 'mean' (the
      paper's `2 mean|x| / sqrt(Qp)`) or 'mse' (LSQ+'s initialisation: of the
      grids whose end lies at `f * max|x|`, `f` = 1/100..1, as
      `calibration.mse_range` searches them, the step of the one with the
      least mean squared quantization error, per step). From a trained model
      at 2 bits the paper's step can leave a network that a short fine-tune
      does not recover (README, Quantizers).
    max_samples: a per-tensor 'mse' search scores this many values, evenly
      strided over the data, when there are more (as `StaticRange`'s).
  """
  sign: str = "signed"
  channel_axis: int | None = None
  batch_axis: int | None = None
  learn_offset: bool = False
  step_init: str = "mean"
  max_samples: int | None = 1 << 18

  def __post_init__(self):
    if self.sign not in SIGNS:
      raise ValueError(f"sign is {self.sign!r}; allowed: {', '.join(SIGNS)}")
    if self.step_init not in LSQ_INITS:
      raise ValueError(f"step_init is {self.step_init!r}; allowed: {', '.join(LSQ_INITS)}")

  def _shape(self, x: Array) -> tuple[int, ...]:
    if self.channel_axis is None:
      return ()
    shape = [1] * x.ndim
    shape[self.channel_axis] = x.shape[self.channel_axis]
    return tuple(shape)

  def num_elements(self, shape: tuple[int, ...]) -> int:
    """`N` of the gradient scale for a tensor of `shape`: the values per step."""
    n = math.prod(shape)
    if self.channel_axis is not None:
      n //= shape[self.channel_axis]
    if self.batch_axis is not None:
      n //= shape[self.batch_axis]
    return max(n, 1)

  def init(self, x: Array) -> PyTree:
    params = {"step": jnp.ones(self._shape(x), jnp.float32)}
    if self.learn_offset:
      params["offset"] = jnp.zeros(self._shape(x), jnp.float32)
    if self.sign == "auto":
      params["signed"] = jnp.ones((), jnp.float32)
    return params

  def _reduce(self, x: Array, fn) -> Array:
    if self.channel_axis is None:
      return fn(x)
    axes = tuple(a for a in range(x.ndim) if a != self.channel_axis % x.ndim)
    return fn(x, axis=axes, keepdims=True)

  def _mse_step(self, x: Array, bits: ArrayLike, signed: Array) -> Array:
    """The least-squared-error step on LSQ's grid (signed or not, traced)."""
    if self.channel_axis is None and self.max_samples and x.size > self.max_samples:
      x = calibration.strided_subset(x, self.max_samples)
    grids = {"signed": (True,), "unsigned": (False,)}.get(self.sign, (True, False))
    steps = []
    for is_signed in grids:
      spec = affine.AffineSpec(signed=is_signed, channel_axis=self.channel_axis)
      lo, hi = calibration.mse_range(x, bits, spec, chunk_size=10)
      steps.append(affine.compute_scale(lo, hi, bits, spec)[0])
    step = steps[0] if len(steps) == 1 else jnp.where(signed, *steps)
    return jnp.reshape(step, self._shape(x))

  def calibrate(self, params: PyTree, x: Array, bits: ArrayLike) -> PyTree:
    """Step `2 mean|x| / sqrt(Qp)` (LSQ) or of least squared error (`step_init='mse'`);
    LSQ+ maps `[min, max]` onto the grid."""
    params = dict(params)
    if self.sign == "auto":
      signed = jnp.min(x) < 0
      params["signed"] = signed.astype(jnp.float32)
    else:
      signed = jnp.asarray(self.sign == "signed")
    qn_s, qp_s = lsq_bounds(bits, True)
    qn_u, qp_u = lsq_bounds(bits, False)
    qn = jnp.where(signed, qn_s, qn_u)
    qp = jnp.maximum(jnp.where(signed, qp_s, qp_u), 1.0)
    if self.learn_offset:
      lo, hi = self._reduce(x, jnp.min), self._reduce(x, jnp.max)
      lo = jnp.where(signed, lo, jnp.minimum(lo, 0.0))
      step = (hi - lo) * (1.0 / (qn + qp))
      params["offset"] = jnp.broadcast_to(lo + qn * step, params["offset"].shape)
    elif self.step_init == "mse":
      step = self._mse_step(x, bits, signed)
    else:
      step = 2.0 * self._reduce(jnp.abs(x), jnp.mean) * jax.lax.rsqrt(qp)
    step = jnp.where(step > 0, step, 1.0)
    params["step"] = jnp.broadcast_to(step, params["step"].shape).astype(jnp.float32)
    return params

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    del key
    kwargs = dict(step=params["step"], bits=bits, num_elements=self.num_elements(x.shape),
                  offset=params.get("offset"))
    if self.sign == "auto":
      q = jnp.where(jax.lax.stop_gradient(params["signed"]) > 0,
                    lsq_fake_quant(x, signed=True, **kwargs),
                    lsq_fake_quant(x, signed=False, **kwargs))
    else:
      q = lsq_fake_quant(x, signed=self.sign == "signed", **kwargs)
    return passthrough(x, q, bits)


def pact_fake_quant(x: Array, clip: Array, bits: ArrayLike, *, signed: bool) -> Array:
  """PACT: clip to `[0, clip]` (or `[-clip, clip]`), quantize with the STE.

  The gradient to `clip` is `1[x >= clip]` (and `-1[x <= -clip]` when
  signed); to `x` it is `1` inside the clip range and 0 outside.
  """
  bits = jnp.asarray(bits, jnp.int32)
  clip = jnp.maximum(jnp.abs(clip), MIN_STEP)
  if signed:
    y = jnp.minimum(jnp.maximum(x, -clip), clip)
    spec = affine.AffineSpec(signed=True, narrow_range=True)
    lo = -clip
  else:
    y = jnp.minimum(jnp.maximum(x, 0.0), clip)
    spec = affine.AffineSpec(signed=False)
    lo = jnp.zeros_like(clip)
  q = affine.fake_quant(jax.lax.stop_gradient(y), bits, spec,
                        lo=jax.lax.stop_gradient(lo), hi=jax.lax.stop_gradient(clip))
  return ste(y, q)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PACT(Quantizer):
  """PACT activation quantizer with a learned clip `alpha` (per tensor).

  Attributes:
    sign: 'unsigned' (PACT: after ReLU), 'signed' (clip to `[-alpha, alpha]`,
      narrow signed grid) or 'auto' (decided from the data at calibration).
    init_clip: alpha before calibration (PACT uses 10 on CIFAR).
    calibrate_clip: set alpha to the calibration data's max |x| in
      `calibrate`; otherwise keep `init_clip`.
  """
  sign: str = "unsigned"
  init_clip: float = 10.0
  calibrate_clip: bool = True

  def __post_init__(self):
    if self.sign not in SIGNS:
      raise ValueError(f"sign is {self.sign!r}; allowed: {', '.join(SIGNS)}")
    if not self.init_clip > 0:
      raise ValueError(f"init_clip is {self.init_clip!r}; allowed: a positive number")

  def init(self, x: Array) -> PyTree:
    del x
    params = {"clip": jnp.asarray(self.init_clip, jnp.float32)}
    if self.sign == "auto":
      params["signed"] = jnp.zeros((), jnp.float32)
    return params

  def calibrate(self, params: PyTree, x: Array, bits: ArrayLike) -> PyTree:
    del bits
    params = dict(params)
    if self.sign == "auto":
      params["signed"] = (jnp.min(x) < 0).astype(jnp.float32)
    if self.calibrate_clip:
      top = jnp.max(jnp.abs(x))
      params["clip"] = jnp.where(top > 0, top, params["clip"]).astype(jnp.float32)
    return params

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    del key
    clip = params["clip"]
    if self.sign == "auto":
      q = jnp.where(jax.lax.stop_gradient(params["signed"]) > 0,
                    pact_fake_quant(x, clip, bits, signed=True),
                    pact_fake_quant(x, clip, bits, signed=False))
    else:
      q = pact_fake_quant(x, clip, bits, signed=self.sign == "signed")
    return passthrough(x, q, bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HAQActivation(PACT):
  """HAQ's activation quantizer: learnable clip (init 6), unsigned after ReLU,
  signed elsewhere; the sign is decided from the data at calibration."""
  sign: str = "auto"
  init_clip: float = 6.0
