"""The static geometry of a layer's linear map, and its im2col view.

A layer-wise reconstruction (AdaRound) needs the layer's map without the
module: `LayerGeometry` holds the kind, strides, padding and groups of a
`QConv` or `QDense` (hashable, so it can be a static `jit` argument), and
`layer_geometries` reads them off a model by tracing it abstractly.

`patches` and `group_kernel` write a convolution as one matrix product per
group, `[rows, groups, k] x [groups, k, out/groups]` with
`k = kh * kw * in/groups` (im2col), which is what the second moments of the
layer's inputs are taken over.

Example:
  >>> import jax.numpy as jnp
  >>> from haqjax.ptq.layer_geometry import LayerGeometry
  >>> conv = LayerGeometry(kind="conv", strides=2)
  >>> conv.apply(jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))).shape
  (1, 4, 4, 4)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.nn.layers import layer_name
from haqjax.typing import Array, ArrayLike, PyTree

KINDS = ("conv", "dense")
# Patches feed second-moment sums that cancel large terms: no reduced-precision
# matmuls (TPU/GPU).
EXACT = jax.lax.Precision.HIGHEST


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


def patches(x: Array, geometry: LayerGeometry, kernel_shape: Sequence[int]
            ) -> Array:
  """The rows the kernel multiplies: `[rows, groups, k]` (im2col for conv)."""
  if geometry.kind == "dense":
    return x.reshape(-1, 1, x.shape[-1])
  kh, kw, cg, _ = kernel_shape
  p = jax.lax.conv_general_dilated_patches(  # features ordered (c, kh, kw)
      x, (kh, kw), geometry.strides, geometry.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=EXACT)
  return p.reshape(-1, geometry.groups, cg * kh * kw)


def group_kernel(w: Array, geometry: LayerGeometry) -> Array:
  """`w` as `[groups, k, out/groups]`, matching `patches`."""
  if geometry.kind == "dense":
    return w[None]
  kh, kw, cg, cout = w.shape
  g = geometry.groups
  return jnp.transpose(w, (2, 0, 1, 3)).reshape(cg * kh * kw, g, cout // g
                                                ).transpose(1, 0, 2)
