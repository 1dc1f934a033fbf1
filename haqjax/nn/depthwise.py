"""Depthwise convolution as shifted multiply-adds, for backends slow at it.

XLA:CPU runs a depthwise convolution (`feature_group_count` equal to the
input channels, one input channel per group) as a grouped convolution far
below its dense speed: a 3x3 stride-2 depthwise layer on a 32x112x112x96
batch takes 0.5 s forward and 4.9 s forward and backward on a 2-core CPU.
Written out over the kernel taps,

  y[n, o, p, c] = sum_{i, j} x[n, o*s + i*d - lo, p*s + j*d - lo, c] * w[i, j, c],

the same convolution is one elementwise loop that XLA fuses and vectorizes
over the channels: 25 ms forward, 0.12 s forward and backward for that
layer. The gradients are written the same way (`jax.custom_vjp`): the input
gradient is a sum of shifted (for strides above 1, zero-interleaved) copies
of the output gradient times each tap, one fused loop; the kernel gradient
is one variadic reduction over the batch of every tap's products, then a sum
over rows and columns. Autodiff of the forward gives the same numbers at
2.5x the backward time (it materialises a padded array per tap).

`haqjax.nn.layers.QConv` uses this form where `uses_taps` says so: for a
depthwise convolution on a backend of `TAP_BACKENDS` (CPU), decided at trace
time by `jax.default_backend()`; elsewhere (GPU and TPU run grouped
convolutions well) it keeps `jax.lax.conv_general_dilated`. Under `vmap` the
taps stay elementwise, so a sweep over members needs no grouped convolution
to unroll (compare `haqjax.nn.batching`).

The values equal `jax.lax.conv_general_dilated`'s up to float summation
order: each output sums `kh * kw` products (the kernel gradient: batch x
rows x columns products) in another order than the reference's, and both are
within `gamma_n * sum |products|` of the exact sum (Higham, Accuracy and
Stability of Numerical Algorithms, 2002, eq. 3.5).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp

from haqjax.typing import Array
from haqjax.typing import Shape

# Backends on which depthwise convolutions run as shifted multiply-adds.
TAP_BACKENDS = ("cpu",)

# Per spatial dimension: (stride, dilation, low padding, high padding).
Geometry = tuple[tuple[int, int, int, int], tuple[int, int, int, int]]


def is_depthwise(x_shape: Shape, kernel_shape: Shape, feature_group_count: int) -> bool:
  """Whether an NHWC/HWIO convolution has one input channel per group (and > 1 group)."""
  return (feature_group_count > 1 and x_shape[-1] == feature_group_count
          and kernel_shape[2] == 1)


def uses_taps(x_shape: Shape, kernel_shape: Shape, feature_group_count: int) -> bool:
  """Whether `QConv` runs this convolution as shifted multiply-adds here."""
  return (jax.default_backend() in TAP_BACKENDS
          and is_depthwise(x_shape, kernel_shape, feature_group_count))


def _valid_range(size: int, out: int, offset: int, stride: int) -> tuple[int, int]:
  """`[o0, o1)`: the outputs `o` whose input `o * stride + offset` is in `[0, size)`."""
  o0 = -(offset // stride) if offset < 0 else 0  # ceil(-offset / stride)
  o1 = min(out, (size - 1 - offset) // stride + 1) if offset < size else 0
  return o0, max(o0, o1)


def _tap_slice(x: Array, out: tuple[int, int], geometry: Geometry, i: int, j: int
               ) -> tuple[Array, tuple[tuple[int, int], ...]] | None:
  """What the outputs read at tap `(i, j)` of NHWC `x`, on the outputs that read no padding.

  Returns the strided slice of `x` and the output ranges `((o0, o1), (p0,
  p1))` it covers, or None when the tap reads only padding.
  """
  ranges, starts, limits, strides = [], [0] * x.ndim, list(x.shape), [1] * x.ndim
  for axis, tap, n_out, (s, d, lo, _) in zip((1, 2), (i, j), out, geometry):
    offset = tap * d - lo
    o0, o1 = _valid_range(x.shape[axis], n_out, offset, s)
    if o1 <= o0:
      return None
    ranges.append((o0, o1))
    starts[axis] = o0 * s + offset
    limits[axis] = (o1 - 1) * s + offset + 1
    strides[axis] = s
  return jax.lax.slice(x, starts, limits, strides), tuple(ranges)


def _taps_forward(x: Array, kernel: Array, geometry: Geometry,
                  out: tuple[int, int]) -> Array:
  """`sum_ij shift_ij(x) * w[i, j]`, one fused loop. x [N, H, W, C], kernel [kh, kw, C]."""
  kh, kw, _ = kernel.shape
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = _tap_slice(x, out, geometry, i, j)
      if tap is None:
        continue
      t, ((o0, o1), (p0, p1)) = tap
      t = jax.lax.pad(t * kernel[i, j], jnp.zeros((), t.dtype),
                      ((0, 0, 0), (o0, out[0] - o1, 0), (p0, out[1] - p1, 0), (0, 0, 0)))
      y = t if y is None else y + t
  if y is None:  # Every tap reads padding only.
    y = jnp.zeros((x.shape[0], *out, x.shape[-1]), x.dtype)
  return y


def _input_grad(g: Array, kernel: Array, geometry: Geometry, size: tuple[int, int]
                ) -> Array:
  """`dx = sum_ij unshift_ij(g) * w[i, j]`: each tap's outputs put back where it read."""
  kh, kw, _ = kernel.shape
  out = g.shape[1:3]
  dx = jnp.zeros((g.shape[0], *size, g.shape[-1]), g.dtype)
  for i in range(kh):
    for j in range(kw):
      config = [(0, 0, 0)]
      for tap, n_in, n_out, (s, d, lo, _) in zip((i, j), size, out, geometry):
        low = tap * d - lo  # Where output 0 reads; then every s-th input.
        config.append((low, n_in - 1 - (n_out - 1) * s - low, s - 1))
      config.append((0, 0, 0))
      dx = dx + jax.lax.pad(g * kernel[i, j], jnp.zeros((), g.dtype), config)
  return dx


def _kernel_grad(x: Array, g: Array, geometry: Geometry, kernel_shape: Shape) -> Array:
  """`dw[i, j] = sum_{n, o, p} shift_ij(x) * g`: one pass over `x` and `g` for all taps.

  One variadic reduction over the batch computes the `kh * kw` products
  and their batch sums in a single loop, [Ho, Wo, C] per tap, which one more
  reduction sums over (rows, columns). Separate reductions per tap made
  XLA:CPU materialise every shifted copy of `x` first (3.5x slower on a
  32x56x56x144 map), and reducing over (batch, rows, columns) at once ran
  2x slower than this two-stage sum.
  """
  kh, kw = kernel_shape[:2]
  out = g.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  products = []
  for i in range(kh):
    for j in range(kw):
      tap = _tap_slice(x, out, geometry, i, j)
      if tap is None:
        products.append(jnp.zeros_like(g))
        continue
      t, ((o0, o1), (p0, p1)) = tap
      t = jax.lax.pad(t, zero, ((0, 0, 0), (o0, out[0] - o1, 0), (p0, out[1] - p1, 0),
                                (0, 0, 0)))
      products.append(t * g)  # [N, Ho, Wo, C]
  sums = jax.lax.reduce(tuple(products), (zero,) * len(products),
                        lambda a, b: tuple(u + v for u, v in zip(a, b)), (0,))
  dw = jnp.sum(jnp.stack(sums), axis=(1, 2))  # [kh * kw, C]
  return dw.reshape(kh, kw, 1, -1)


def by_batch_chunks(fn, x: Array, out_shape: Shape) -> Array:
  """`fn(x)` `[N, ...] -> out_shape`, run on slices of the batch in a loop.

  Each of `x`'s elements is read by `kh * kw` taps. XLA:CPU fuses an
  elementwise producer of `x` into the taps' loop and so computes it
  `kh * kw` times per element; behind a fake-quant (and the batch norm and
  activation before it) that made a MobileNetV2 evaluation 3.5-7x slower
  than the same network in floating point. A loop's operand is written
  once, so here `x` is; the slices (the batch split in the fewest equal
  parts, at least two) keep the taps one fused pass each. A batch of one
  runs `fn` directly.
  """
  n = x.shape[0]
  parts = next((d for d in range(2, n + 1) if n % d == 0), 1)
  if parts == 1:
    return fn(x)
  size = n // parts

  def body(i, y):
    part = fn(jax.lax.dynamic_slice_in_dim(x, i * size, size, 0))
    return jax.lax.dynamic_update_slice_in_dim(y, part, i * size, 0)
  return jax.lax.fori_loop(0, parts, body, jnp.zeros(out_shape, x.dtype))


def _forward(x: Array, kernel: Array, geometry: Geometry, materialize: bool) -> Array:
  out = _out_size(x.shape, kernel.shape, geometry)
  taps = lambda part: _taps_forward(part, kernel[:, :, 0], geometry, out)
  if not materialize:
    return taps(x)
  return by_batch_chunks(taps, x, (x.shape[0], *out, kernel.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: Array, kernel: Array, geometry: Geometry, materialize: bool) -> Array:
  return _forward(x, kernel, geometry, materialize)


def _depthwise_fwd(x, kernel, geometry, materialize):
  return _forward(x, kernel, geometry, materialize), (x, kernel)


def _depthwise_bwd(geometry, materialize, residuals, g):
  x, kernel = residuals
  size = x.shape[1:3]
  grad = lambda part: _input_grad(part, kernel[:, :, 0], geometry, size)
  dx = by_batch_chunks(grad, g, x.shape) if materialize else grad(g)
  return dx, _kernel_grad(x, g, geometry, kernel.shape).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def _out_size(x_shape: Shape, kernel_shape: Shape, geometry: Geometry) -> tuple[int, int]:
  return tuple((n + lo + hi - ((k - 1) * d + 1)) // s + 1
               for n, k, (s, d, lo, hi) in zip(x_shape[1:3], kernel_shape[:2], geometry))


def depthwise_conv(x: Array, kernel: Array, *, window_strides: Sequence[int],
                   padding: str | Sequence[tuple[int, int]],
                   rhs_dilation: Sequence[int] = (1, 1), materialize: bool = False,
                   custom_gradient: bool = True) -> Array:
  """A depthwise NHWC/HWIO convolution as shifted multiply-adds over the taps.

  Args:
    x: the input, [N, H, W, C].
    kernel: the kernel, [kh, kw, 1, C * m] (m: the depth multiplier; output
      channel `c * m + k` reads input channel `c`).
    window_strides: stride per spatial dimension.
    padding: 'SAME', 'VALID' or ((lo, hi), (lo, hi)).
    rhs_dilation: kernel dilation per spatial dimension.
    materialize: write `x` (and, backward, the output gradient) to memory
      once before the taps read it (`by_batch_chunks`), for an input whose
      producer costs more than the extra pass over memory (a fake-quant).
    custom_gradient: the hand-written gradients above; False differentiates
      the taps by autodiff instead (slower, but to any order and in forward
      mode, as Hessian-vector products need).

  Returns:
    [N, Ho, Wo, C * m], `jax.lax.conv_general_dilated(x, kernel, ...,
    feature_group_count=C)` up to summation order.

  Raises:
    ValueError: a kernel that is not depthwise for `x`.

  Example:
    >>> x = jnp.ones((2, 8, 8, 4))
    >>> depthwise_conv(x, jnp.ones((3, 3, 1, 4)), window_strides=(2, 2),
    ...                padding="SAME").shape
    (2, 4, 4, 4)
  """
  channels = x.shape[-1]
  if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] % channels:
    raise ValueError(f"kernel shape is {kernel.shape} for {channels} input channels; "
                     f"allowed: [kh, kw, 1, {channels} * m]")
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in rhs_dilation)
  if isinstance(padding, str):
    window = tuple((k - 1) * d + 1 for k, d in zip(kernel.shape[:2], dilation))
    pads = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  else:
    pads = padding
  geometry = tuple((s, d, int(lo), int(hi))
                   for s, d, (lo, hi) in zip(strides, dilation, pads))
  multiplier = kernel.shape[3] // channels
  if multiplier > 1:  # Output channel c * m + k reads input channel c.
    x = jnp.repeat(x, multiplier, axis=-1)
  dtype = jnp.promote_types(jnp.result_type(x, kernel), jnp.float32)
  conv = _depthwise if custom_gradient else _forward
  y = conv(x.astype(dtype), kernel.astype(dtype), geometry, bool(materialize))
  return y.astype(jnp.result_type(x, kernel))

