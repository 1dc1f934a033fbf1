"""1x1 convolutions as matrix products, for backends slow at their gradients.

A 1x1 convolution with one group and no padding is the matrix product of
the `[N * H * W, C_in]` input (taken every `stride` pixels) and the
`[C_in, C_out]` kernel. XLA:CPU runs its forward pass well either way, but
the kernel gradient of the convolution form is a convolution whose window is
the whole feature map, which it runs at about 1 GMAC/s after transposing both
operands: in a MobileNetV2 training step at batch 32 (224x224) these took
over a third of the step. As a matrix product the three passes (output,
input gradient, kernel gradient) are three GEMMs: 0.14 s instead of 1.2 s
forward and backward for the 32x112x112x32 -> 96 expansion on a 2-core CPU. Under `vmap` the
product is a batched matrix product, so a sweep over members needs no
convolution to unroll (compare `haqjax.nn.batching`).

`haqjax.nn.layers.QConv` uses this form where `uses_matmul` says so: for a
1x1 convolution on a backend of `MATMUL_BACKENDS` (CPU), decided at trace
time by `jax.default_backend()`; GPU and TPU keep
`jax.lax.conv_general_dilated`, which they run as a GEMM already.

Each output sums `C_in` products in both forms, in different orders, so the
values agree to within float summation error (`gamma_{C_in}` of the sum of
the products' magnitudes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from haqjax.typing import Array
from haqjax.typing import Shape

# Backends on which 1x1 convolutions run as matrix products.
MATMUL_BACKENDS = ("cpu",)


def _zero_padding(padding: str | Sequence[tuple[int, int]]) -> bool:
  """Whether `padding` pads a 1x1 convolution by nothing ('SAME' and 'VALID' do not)."""
  if isinstance(padding, str):
    return padding in ("SAME", "VALID")
  return all(int(lo) == 0 and int(hi) == 0 for lo, hi in padding)


def is_pointwise(kernel_shape: Shape, feature_group_count: int,
                 padding: str | Sequence[tuple[int, int]]) -> bool:
  """Whether an HWIO kernel is a 1x1 convolution with one group and no padding."""
  return (tuple(kernel_shape[:2]) == (1, 1) and feature_group_count == 1
          and _zero_padding(padding))


def uses_matmul(kernel_shape: Shape, feature_group_count: int,
                padding: str | Sequence[tuple[int, int]]) -> bool:
  """Whether `QConv` runs this convolution as a matrix product here."""
  return (jax.default_backend() in MATMUL_BACKENDS
          and is_pointwise(kernel_shape, feature_group_count, padding))


def pointwise_conv(x: Array, kernel: Array, *, window_strides: Sequence[int]) -> Array:
  """A 1x1 NHWC/HWIO convolution without padding as one matrix product.

  Args:
    x: the input, [N, H, W, C_in].
    kernel: the kernel, [1, 1, C_in, C_out].
    window_strides: stride per spatial dimension.

  Returns:
    [N, ceil(H / sh), ceil(W / sw), C_out], `jax.lax.conv_general_dilated(x,
    kernel, window_strides, 'VALID')` up to summation order.

  Raises:
    ValueError: a kernel that is not 1x1 over `x`'s channels.

  Example:
    >>> pointwise_conv(jnp.ones((2, 5, 5, 3)), jnp.ones((1, 1, 3, 4)),
    ...                window_strides=(2, 2)).shape
    (2, 3, 3, 4)
  """
  if kernel.ndim != 4 or kernel.shape[:3] != (1, 1, x.shape[-1]):
    raise ValueError(f"kernel shape is {kernel.shape} for {x.shape[-1]} input channels; "
                     f"allowed: [1, 1, {x.shape[-1]}, out]")
  sh, sw = (int(s) for s in window_strides)
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw]
  n, h, w, c = x.shape
  y = jax.lax.dot_general(x.reshape(n * h * w, c), kernel.reshape(c, kernel.shape[-1]),
                          (((1,), (0,)), ((), ())))  # [N * H * W, C_out]
  return y.reshape(n, h, w, kernel.shape[-1])
