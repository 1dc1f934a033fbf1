"""Uniform quantizers with min-max or calibrated ranges.

* `MinMaxWeight`: symmetric, per output channel, range from the current
  weights at every call (QAT moves the weights, so the range follows them);
  1 bit is XNOR-style binary with the mean absolute value as scale.
* `MinMaxActivation`: per tensor, range from the current batch; unsigned when
  the batch has no negative value (after ReLU, as HAQ), signed otherwise.
* `StaticRange`: a range fixed by calibration (`haqjax.quant.calibration`:
  min-max, EMA, percentile, MSE, KL) and stored as non-learned parameters, so
  evaluation does not depend on the batch; the clipped STE zeroes the
  gradient of clipped values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from haqjax.quant import affine
from haqjax.quant.base import SIGNS
from haqjax.quant.base import Quantizer
from haqjax.quant.base import passthrough
from haqjax.quant.estimators import clipped_ste
from haqjax.quant.estimators import ste
from haqjax.typing import Array, ArrayLike, PRNGKey, PyTree

ESTIMATORS = ("plain", "clipped")


def _check(field: str, value, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{field} is {value!r}; allowed: {', '.join(allowed)}")


def _estimate(estimator: str, x: Array, q: Array, lo: Array, hi: Array,
              spec: affine.AffineSpec) -> Array:
  """Attaches the straight-through gradient to the quantized `q`."""
  if estimator == "plain":
    return ste(x, q)
  shape = affine.to_groups(x, spec).shape
  lo = jnp.broadcast_to(lo, shape).reshape(x.shape)
  hi = jnp.broadcast_to(hi, shape).reshape(x.shape)
  return clipped_ste(x, q, jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi))


def _no_tangent(x: Array) -> Array:
  """`x` for computing a min-max range and grid that reach the output only as constants.

  The estimators (`ste`, `clipped_ste`) take the quantized tensor and the
  range through `stop_gradient`, so their gradient does not depend on this
  graph. Cutting it at `x` keeps autodiff from differentiating it at all: the
  JVP of the one-pass min-max reduction (`affine.minmax`) is a pairwise tree
  of slices of the whole tensor, which made a MobileNetV2 QAT step trace
  several thousand slices and compile about twice as long.
  """
  return jax.lax.stop_gradient(x)


def _representable(lo: Array, hi: Array, bits: ArrayLike, spec: affine.AffineSpec
                   ) -> tuple[Array, Array]:
  """The real interval the grid covers for the range `[lo, hi]`."""
  scale, zero_point = affine.compute_scale(lo, hi, bits, spec)
  qmin, qmax = affine.qrange(bits, signed=spec.signed, narrow_range=spec.narrow_range)
  return (qmin - zero_point) * scale, (qmax - zero_point) * scale


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMaxWeight(Quantizer):
  """Symmetric weight fake-quant on the current min/max, per channel.

  Attributes:
    spec: grid and granularity; the default is signed symmetric with one
      range per output channel (axis -1 of haqjax kernels). Per-group:
      `AffineSpec(channel_axis=-1, group_size=32, group_axis=-2)`.
    estimator: 'plain' STE (exact when the range is the min/max) or
      'clipped'.
  """
  spec: affine.AffineSpec = affine.AffineSpec(channel_axis=-1)
  estimator: str = "plain"

  def __post_init__(self):
    _check("estimator", self.estimator, ESTIMATORS)

  @property
  def needs_key(self) -> bool:
    return self.spec.rounding == "stochastic"

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    del params
    bits = jnp.asarray(bits, jnp.int32)
    xs = _no_tangent(x)
    lo, hi = affine.compute_range(xs, self.spec)
    if self.spec.signed and self.spec.symmetric:
      # Binary weights use the L2-optimal scale mean|w| (XNOR-Net).
      mean_abs = jnp.mean(jnp.abs(affine.to_groups(xs, self.spec)),
                          axis=affine.reduce_axes(x.ndim, self.spec), keepdims=True)
      lo = jnp.where(bits <= 1, -mean_abs, lo)
      hi = jnp.where(bits <= 1, mean_abs, hi)
    q = affine.fake_quant(xs, bits, self.spec, lo=lo, hi=hi, key=key)
    return passthrough(x, _estimate(self.estimator, x, q, lo, hi, self.spec), bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMaxActivation(Quantizer):
  """Per-tensor activation fake-quant on the current batch's min/max.

  Attributes:
    sign: 'auto' (unsigned when the tensor has no negative value, as HAQ
      does after ReLU), 'signed' or 'unsigned' (negatives clip to 0 and, by
      the clipped STE, get no gradient). Nothing else is clipped (the range
      is the batch's min/max), so the other cases use the plain STE.
    symmetric: symmetric grid (zero point 0); otherwise asymmetric.
    rounding: see `AffineSpec`.
  """
  sign: str = "auto"
  symmetric: bool = True
  rounding: str = "nearest_even"

  def __post_init__(self):
    _check("sign", self.sign, SIGNS)
    affine.AffineSpec(rounding=self.rounding)

  @property
  def needs_key(self) -> bool:
    return self.rounding == "stochastic"

  def _spec(self, signed: bool) -> affine.AffineSpec:
    return affine.AffineSpec(signed=signed, symmetric=self.symmetric,
                             rounding=self.rounding)

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    del params
    xs = _no_tangent(x)
    lo, hi = affine.minmax(xs, range(x.ndim))
    lo, hi = lo.reshape(()), hi.reshape(())
    signed_q = affine.fake_quant(xs, bits, self._spec(True), lo=lo, hi=hi, key=key)
    unsigned_q = affine.fake_quant(xs, bits, self._spec(False), lo=jnp.float32(0.0),
                                   hi=hi, key=key)
    if self.sign == "signed":
      q = signed_q
    elif self.sign == "unsigned":
      # Negative values clip to 0 and do not move with `x`: no gradient.
      clipped = clipped_ste(x, unsigned_q, jnp.zeros_like(hi), hi)
      return passthrough(x, clipped, bits)
    else:  # unsigned only when nothing is negative: nothing is clipped
      q = jnp.where(lo < 0, signed_q, unsigned_q)
    return passthrough(x, ste(x, q), bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StaticRange(Quantizer):
  """Fake-quant on a range set by calibration and then held fixed.

  Parameters: `{"lo": [...], "hi": [...]}` with the kept-dims shape of the
  spec's granularity; they are not learned (wrapped in `stop_gradient`).
  Until `calibrate` runs they are zero, which quantizes everything to 0.

  Attributes:
    spec: grid and granularity (the default suits activations: per tensor,
      symmetric; with `sign='auto'` the grid is unsigned when the calibrated
      range has no negative value).
    sign: 'auto', 'signed' or 'unsigned' (overrides `spec.signed`).
    method: calibration method, one of `haqjax.quant.calibration.METHODS`.
    options: extra keyword options of the method, as (name, value) pairs
      (e.g. `(("percentile", 99.9),)`).
    estimator: 'clipped' (zero gradient for clipped values) or 'plain'.
    max_samples: per-tensor 'percentile', 'mse' and 'kl' calibration searches
      this many values, evenly strided over the data, when there are more (the
      same size for every layer, so the search compiles once); None for all.
  """
  spec: affine.AffineSpec = affine.AffineSpec()
  sign: str = "auto"
  method: str = "minmax"
  options: tuple[tuple[str, object], ...] = ()
  estimator: str = "clipped"
  max_samples: int | None = 1 << 18

  def __post_init__(self):
    _check("sign", self.sign, SIGNS)
    _check("estimator", self.estimator, ESTIMATORS)
    from haqjax.quant import calibration  # pylint: disable=g-import-not-at-top
    _check("method", self.method, calibration.METHODS)

  @property
  def needs_key(self) -> bool:
    return self.spec.rounding == "stochastic"

  def _spec(self, signed: bool) -> affine.AffineSpec:
    return dataclasses.replace(self.spec, signed=signed)

  def init(self, x: Array) -> PyTree:
    lo, hi = affine.compute_range(x, self.spec)
    return {"lo": jnp.zeros_like(lo), "hi": jnp.zeros_like(hi)}

  def calibrate(self, params: PyTree, x: Array, bits: ArrayLike) -> PyTree:
    if self.sign != "auto":
      return self._calibrate(params, x, bits, self.sign == "signed")
    if isinstance(x, jax.core.Tracer):  # Traced: both grids, the data's picked.
      signed, unsigned = (self._calibrate(params, x, bits, s) for s in (True, False))
      negative = jnp.min(x) < 0
      return jax.tree.map(lambda a, b: jnp.where(negative, a, b), signed, unsigned)
    return self._calibrate(params, x, bits, bool(jnp.min(x) < 0))

  def _calibrate(self, params: PyTree, x: Array, bits: ArrayLike, signed: bool) -> PyTree:
    from haqjax.quant import calibration  # pylint: disable=g-import-not-at-top
    per_tensor = not self.spec.channel_axes and self.spec.group_size is None
    if (per_tensor and self.max_samples and x.size > self.max_samples
        and self.method in ("percentile", "mse", "kl")):
      x = calibration.strided_subset(x, self.max_samples)
    lo, hi = calibration.calibrate_range(x, bits, self._spec(signed), self.method,
                                         **dict(self.options))
    return {"lo": jnp.broadcast_to(lo, params["lo"].shape).astype(jnp.float32),
            "hi": jnp.broadcast_to(hi, params["hi"].shape).astype(jnp.float32)}

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    lo = jax.lax.stop_gradient(params["lo"])
    hi = jax.lax.stop_gradient(params["hi"])
    if self.sign == "auto":
      unsigned = jnp.all(lo >= 0)
      q_s = affine.fake_quant(x, bits, self._spec(True), lo=lo, hi=hi, key=key)
      q_u = affine.fake_quant(x, bits, self._spec(False), lo=lo, hi=hi, key=key)
      q = jnp.where(unsigned, q_u, q_s)
      rep_s = _representable(lo, hi, bits, self._spec(True))
      rep_u = _representable(lo, hi, bits, self._spec(False))
      rep_lo = jnp.where(unsigned, rep_u[0], rep_s[0])
      rep_hi = jnp.where(unsigned, rep_u[1], rep_s[1])
    else:
      spec = self._spec(self.sign == "signed")
      q = affine.fake_quant(x, bits, spec, lo=lo, hi=hi, key=key)
      rep_lo, rep_hi = _representable(lo, hi, bits, spec)
    return passthrough(x, _estimate(self.estimator, x, q, rep_lo, rep_hi, self.spec), bits)
