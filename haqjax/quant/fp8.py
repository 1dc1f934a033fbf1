"""FP8 fake-cast (E4M3 and E5M2) with amax scaling and a straight-through gradient.

`x -> cast(clip(x / s, -m, m), fp8) * s` with `s = amax / m`, `m` the
format's largest finite value (E4M3: 448, E5M2: 57344) and `amax` the largest
finite |x| of the tensor, or of each channel. The amax maps onto the top of
the format, so only the relative precision of FP8 is lost (3 mantissa bits
for E4M3, 2 for E5M2), plus underflow of values far below amax. The cast
rounds to nearest even (XLA, like ml_dtypes).

Non-finite values: NaN stays NaN (elementwise, it does not spread), and
+-inf saturate to +-amax (the clip before the cast; amax ignores them). A
tensor or channel with no finite non-zero value has scale 1.

The format is static and the number of bits is fixed, so `bits` is ignored
except `FLOAT_BITS`, which passes `x` through.

References:
  Micikevicius et al. FP8 Formats for Deep Learning. arXiv:2209.05433, 2022.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from haqjax.quant.base import Quantizer
from haqjax.quant.base import passthrough
from haqjax.typing import Array, ArrayLike, PRNGKey, PyTree

FORMATS = {
    "e4m3": jnp.float8_e4m3fn,
    "e5m2": jnp.float8_e5m2,
}
FP8_MAX = {
    "e4m3": 448.0,
    "e5m2": 57344.0,
}


def _reduce_axes(x: Array, channel_axis: int | None) -> tuple[int, ...] | None:
  if channel_axis is None:
    return None
  channel_axis %= x.ndim
  return tuple(a for a in range(x.ndim) if a != channel_axis)


def fp8_fake_cast(x: ArrayLike, fmt: str = "e4m3",
                  channel_axis: int | None = None) -> Array:
  """Rounds `x` to scaled FP8 and back (forward only, no STE).

  Args:
    x: values to round.
    fmt: 'e4m3' (float8_e4m3fn: no infinity, max 448) or 'e5m2' (max 57344).
    channel_axis: axis with its own scale; None for one scale per tensor.

  Returns:
    `x` rounded to FP8 on the scaled grid, with the dtype of `x`.

  Raises:
    ValueError: for an unknown format.

  References:
    Micikevicius et al. FP8 Formats for Deep Learning. 2022 (section 3).
  """
  if fmt not in FORMATS:
    raise ValueError(f"fmt is {fmt!r}; allowed: {', '.join(FORMATS)}")
  x = jnp.asarray(x)
  xf = x.astype(jnp.float32)
  fmax = FP8_MAX[fmt]
  a = jnp.abs(xf)
  amax = jnp.max(jnp.where(jnp.isfinite(a), a, 0.0),
                 axis=_reduce_axes(xf, channel_axis), keepdims=True)
  # Multiply by values computed once per channel, never divide by a broadcast.
  scale = jnp.where(amax > 0, amax * (1.0 / fmax), 1.0)
  inv_scale = jnp.where(amax > 0, fmax / amax, 1.0)
  y = jnp.clip(xf * inv_scale, -fmax, fmax)  # NaN stays NaN.
  y = y.astype(FORMATS[fmt]).astype(jnp.float32)
  return (y * scale).astype(x.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8(Quantizer):
  """FP8 fake-cast of weights or activations with a straight-through gradient.

  Use `channel_axis=-1` for per-output-channel weight scales, None (the
  default) for per-tensor scales (activations). The gradient is the identity
  (with amax scaling nothing finite saturates), and 0 at NaN and +-inf. `bits`
  is ignored except `FLOAT_BITS`: pass-through.

  Attributes:
    fmt: 'e4m3' or 'e5m2'.
    channel_axis: axis with its own scale; None for one per tensor.

  References:
    Micikevicius et al. FP8 Formats for Deep Learning. 2022.
  """
  fmt: str = "e4m3"
  channel_axis: int | None = None

  def __post_init__(self):
    if self.fmt not in FORMATS:
      raise ValueError(f"fmt is {self.fmt!r}; allowed: {', '.join(FORMATS)}")
    if self.channel_axis is not None and (
        isinstance(self.channel_axis, bool) or not isinstance(self.channel_axis, int)):
      raise ValueError(f"channel_axis is {self.channel_axis!r}; allowed: an integer or None")

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    del params, key
    sg = jax.lax.stop_gradient
    # x - x is NaN at +-inf: no straight-through term (nor gradient) there.
    residual = jnp.where(jnp.isfinite(x), x - sg(x), 0).astype(x.dtype)
    q = sg(fp8_fake_cast(x, self.fmt, self.channel_axis)) + residual
    return passthrough(x, q, bits)
