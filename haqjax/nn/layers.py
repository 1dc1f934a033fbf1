"""Quantizable layers: convolution (incl. depthwise/grouped) and dense.

Each layer takes the policy at call time, `layer(x, policy)`, and looks up its
own bits by its module path. `policy=None` runs in floating point. The input
activation is quantized to `a_bits` and the kernel to `w_bits` before the
matmul/convolution, as in HAQ.

Quantizers are static: a layer's `weight_quantizer` / `act_quantizer` when
set, else the `quant_scheme` (a `haqjax.quant.QuantScheme`) of the nearest
enclosing module that has one (the model), else min-max STE fake-quant. So a
model takes any quantizer per role and per layer without changing its code.
Quantizers that round stochastically draw from the `quant` RNG stream.

Shapes: convolution kernels are `[kh, kw, in/groups, out]`, dense kernels
`[in, out]`, activations NHWC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from haqjax.policy import Policy
from haqjax.quant.base import Quantizer
from haqjax.quant.uniform import MinMaxActivation
from haqjax.quant.uniform import MinMaxWeight
from haqjax.typing import Array

Initializer = Callable[..., Array]
DEFAULT_WEIGHT_QUANTIZER = MinMaxWeight()
DEFAULT_ACT_QUANTIZER = MinMaxActivation()


def layer_name(module: nn.Module) -> str:
  """The name a layer has in the layer table and the policy: its module path."""
  return "/".join(module.scope.path)


def _scheme(module: nn.Module):
  """The `quant_scheme` of the nearest enclosing module that sets one."""
  parent = module.parent
  while isinstance(parent, nn.Module):
    scheme = getattr(parent, "quant_scheme", None)
    if scheme is not None:
      return scheme
    parent = parent.parent
  return None


class _QuantizedLayer(nn.Module):
  """Shared quantization of (input, kernel) for haqjax layers."""

  def quantizers(self) -> tuple[Quantizer, Quantizer]:
    """This layer's `(weight_quantizer, act_quantizer)`."""
    wq, aq = self.weight_quantizer, self.act_quantizer
    if wq is None or aq is None:
      scheme = _scheme(self)
      if scheme is not None:
        swq, saq = scheme.for_layer(layer_name(self))
        wq = swq if wq is None else wq
        aq = saq if aq is None else aq
    return (DEFAULT_WEIGHT_QUANTIZER if wq is None else wq,
            DEFAULT_ACT_QUANTIZER if aq is None else aq)

  def _quantize(self, x: Array, kernel: Array,
                policy: Policy | None) -> tuple[Array, Array]:
    wq, aq = self.quantizers()
    w_params = wq.init(kernel)
    if w_params:
      w_params = self.param("weight_quant", lambda _: w_params)
    a_params = aq.init(x)
    if a_params:
      a_params = self.param("act_quant", lambda _: a_params)
    if policy is None:
      return x, kernel
    w_bits, a_bits = policy.bits_for(layer_name(self))
    a_key = self.make_rng("quant") if aq.needs_key else None
    w_key = self.make_rng("quant") if wq.needs_key else None
    return aq(a_params, x, a_bits, a_key), wq(w_params, kernel, w_bits, w_key)


class QConv(_QuantizedLayer):
  """2-D convolution with per-call weight/activation bits.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: stride, an int or (sh, sw).
    padding: 'SAME', 'VALID' or explicit ((top, bottom), (left, right)).
    feature_group_count: groups; equal to the input channels for depthwise.
    use_bias: add a bias after the convolution.
    weight_quantizer, act_quantizer: the quantizers for each role (None: the
      enclosing model's `quant_scheme`, else min-max).
    dtype: computation dtype (e.g. bfloat16 on TPU); parameters stay float32.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] = "SAME"
  feature_group_count: int = 1
  use_bias: bool = False
  kernel_init: Initializer = nn.initializers.variance_scaling(
      2.0, "fan_out", "normal")
  bias_init: Initializer = nn.initializers.zeros
  weight_quantizer: Quantizer | None = None
  act_quantizer: Quantizer | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None = None) -> Array:
    in_ch = x.shape[-1]
    groups = self.feature_group_count
    if in_ch % groups or self.features % groups:
      raise ValueError(f"{layer_name(self)}: channels in={in_ch} out={self.features} "
                       f"are not divisible by groups={groups}")
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, in_ch // groups,
                                                     self.features))
    x, kernel = self._quantize(x, kernel, policy)
    strides = ((self.strides,) * 2 if isinstance(self.strides, int)
               else tuple(self.strides))
    padding = self.padding if isinstance(self.padding, str) else tuple(
        tuple(p) for p in self.padding)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=strides,
        padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
    return y


class QDense(_QuantizedLayer):
  """Dense layer over the last axis with per-call weight/activation bits."""
  features: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  weight_quantizer: Quantizer | None = None
  act_quantizer: Quantizer | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None = None) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    x, kernel = self._quantize(x, kernel, policy)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
    return y
