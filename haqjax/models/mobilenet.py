"""MobileNetV1 (Howard et al. 2017) and MobileNetV2 (Sandler et al. 2018).

Every convolution, depthwise convolution and the classifier are haqjax layers,
so a policy gives each its own bits. Layer names, in forward order (HAQ's
order):

* V1: `stem`, `block{i}/depthwise`, `block{i}/pointwise` for i = 1..13,
  `classifier` (28 layers).
* V2: `stem`, then per inverted-residual block i = 1..17 `block{i}/expand`
  (when the expansion factor is not 1), `block{i}/depthwise`,
  `block{i}/project`, then `head` (the 1x1 conv to 1280 channels) and
  `classifier` (53 layers).

Channel counts follow torchvision: V2 rounds `c * width_mult` to a multiple of
8 (`make_divisible`) and scales the last 1280 channels only when
`width_mult > 1`; V1 rounds the same way (equal to `int(c * width_mult)` for
the usual multipliers 0.25, 0.5, 0.75, 1). At width 1 and 1000 classes V1 has
4,231,976 parameters and ~569M MACs, V2 3,504,872 parameters and ~301M MACs.
Convolutions pad symmetrically (k // 2) as the PyTorch models do.

`mobilenet_v2_small` is V2 for 28x28 and 32x32 inputs: the stem and the
second stage keep stride 1 (the usual CIFAR variant), so a 32x32 input ends
at 4x4 instead of 1x1.

References:
  Howard et al. MobileNets: Efficient Convolutional Neural Networks for
  Mobile Vision Applications. 2017. https://arxiv.org/abs/1704.04861
  Sandler et al. MobileNetV2: Inverted Residuals and Linear Bottlenecks.
  CVPR 2018. https://arxiv.org/abs/1801.04381
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from haqjax.models.base import ZooModel
from haqjax.models.cnn import check_positive
from haqjax.models.cnn import conv_bn
from haqjax.nn.layers import QDense
from haqjax.policy import Policy
from haqjax.typing import Array

# MobileNetV1 separable blocks: (pointwise output channels, depthwise stride).
V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
             (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2),
             (1024, 1))

# MobileNetV2 stages: (expansion t, output channels c, blocks n, stride s).
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds `v` to the nearest multiple of `divisor`, losing at most 10%.

  The rounding of the TensorFlow/torchvision MobileNets, used for the width
  multiplier.
  """
  min_value = divisor if min_value is None else min_value
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


def relu6(x: Array) -> Array:
  return jnp.minimum(jax.nn.relu(x), 6.0)


class MobileNetV1(ZooModel):
  """MobileNetV1: a 3x3/2 conv, 13 depthwise-separable blocks, GAP, classifier.

  Attributes:
    num_classes: classifier outputs.
    width_mult: the width multiplier alpha (channels x alpha, rounded to 8).
  """
  num_classes: int = 1000
  width_mult: float = 1.0

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None = None,
               train: bool = False) -> Array:
    kw = dict(train=train, dtype=self.dtype)
    ch = lambda c: make_divisible(c * self.width_mult)
    x = conv_bn(x, policy, "stem", ch(32), 3, 2, **kw)
    for i, (c, s) in enumerate(V1_BLOCKS, start=1):
      x = _Separable(ch(c), s, self.dtype, name=f"block{i}")(x, policy, train)
    x = jnp.mean(x, axis=(1, 2))
    x = QDense(self.num_classes, dtype=self.dtype, name="classifier")(x, policy)
    return x.astype(jnp.float32)


class _Separable(nn.Module):
  """3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU."""
  features: int
  strides: int
  dtype: Any

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None, train: bool) -> Array:
    kw = dict(train=train, dtype=self.dtype)
    x = conv_bn(x, policy, "depthwise", x.shape[-1], 3, self.strides,
                depthwise=True, **kw)
    return conv_bn(x, policy, "pointwise", self.features, 1, **kw)


class InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project.

  The expand conv is left out when `expansion == 1`; the residual is added
  when the block keeps the shape (stride 1, same channels).

  Attributes:
    features: output channels.
    strides: stride of the depthwise conv.
    expansion: the expansion factor t (hidden = round(in * t)).
    dtype: computation dtype.
    clip_relu: ReLU6 (True, MobileNetV2) or plain ReLU (False, the form
      data-free quantization equalizes).
  """
  features: int
  strides: int
  expansion: int
  dtype: Any = jnp.float32
  clip_relu: bool = True

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None, train: bool) -> Array:
    kw = dict(train=train, dtype=self.dtype)
    in_ch = x.shape[-1]
    hidden = int(round(in_ch * self.expansion))
    act = relu6 if self.clip_relu else nn.relu
    y = x
    if self.expansion != 1:
      y = conv_bn(y, policy, "expand", hidden, 1, act=act, **kw)
    y = conv_bn(y, policy, "depthwise", hidden, 3, self.strides,
                depthwise=True, act=act, **kw)
    y = conv_bn(y, policy, "project", self.features, 1, act=None, **kw)
    if self.strides == 1 and in_ch == self.features:
      y = y + x
    return y


class MobileNetV2(ZooModel):
  """MobileNetV2: a 3x3 conv, 17 inverted residuals, a 1x1 head, GAP, classifier.

  Attributes:
    num_classes: classifier outputs.
    width_mult: the width multiplier (channels rounded to multiples of 8; the
      1280 head channels are scaled only when > 1).
    stem_strides: stride of the first conv (2 for 224x224, 1 for small inputs).
    stage_strides: stride of the first block of each of the seven stages.
    dropout_rate: dropout before the classifier (torchvision uses 0.2). When
      non-zero, training needs a 'dropout' rng (`rngs={'dropout': key}`).
    clip_relu: ReLU6 everywhere (True) or plain ReLU (False): data-free
      quantization (Nagel et al. 2019) replaces ReLU6 by ReLU so that
      cross-layer equalization is exact; `haqjax.ptq` does so with
      `relu6='relu'`.
  """
  num_classes: int = 1000
  width_mult: float = 1.0
  stem_strides: int = 2
  stage_strides: Sequence[int] = tuple(s for _, _, _, s in V2_STAGES)
  dropout_rate: float = 0.0
  clip_relu: bool = True

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None = None,
               train: bool = False) -> Array:
    if len(self.stage_strides) != len(V2_STAGES):
      raise ValueError(f"stage_strides has {len(self.stage_strides)} entries; "
                       f"allowed: {len(V2_STAGES)}, one per stage")
    kw = dict(train=train, dtype=self.dtype)
    x = conv_bn(x, policy, "stem", make_divisible(32 * self.width_mult), 3,
                self.stem_strides, act=relu6 if self.clip_relu else nn.relu, **kw)
    i = 1
    for (t, c, n, _), s in zip(V2_STAGES, self.stage_strides):
      out = make_divisible(c * self.width_mult)
      for b in range(n):
        x = InvertedResidual(out, s if b == 0 else 1, t, self.dtype, self.clip_relu,
                             name=f"block{i}")(x, policy, train)
        i += 1
    last = make_divisible(1280 * max(1.0, self.width_mult))
    x = conv_bn(x, policy, "head", last, 1, act=relu6 if self.clip_relu else nn.relu,
                **kw)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = QDense(self.num_classes, dtype=self.dtype, name="classifier")(x, policy)
    return x.astype(jnp.float32)


def mobilenet_v1(num_classes: int = 1000, width_mult: float = 1.0,
                 dtype: Any = jnp.float32) -> MobileNetV1:
  """MobileNetV1 for 224x224 images (4,231,976 parameters at width 1)."""
  check_positive("width_mult", width_mult)
  return MobileNetV1(num_classes, width_mult, dtype=dtype)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0,
                 dtype: Any = jnp.float32) -> MobileNetV2:
  """MobileNetV2 for 224x224 images (3,504,872 parameters at width 1)."""
  check_positive("width_mult", width_mult)
  return MobileNetV2(num_classes, width_mult, dtype=dtype)


def mobilenet_v2_small(num_classes: int = 10, width_mult: float = 1.0,
                       dtype: Any = jnp.float32) -> MobileNetV2:
  """MobileNetV2 for 28x28 / 32x32 inputs: stem and stage-2 strides are 1.

  The remaining stride-2 stages (3, 4, 6) take 32x32 to 4x4 and 28x28 to 4x4.
  """
  check_positive("width_mult", width_mult)
  return MobileNetV2(num_classes, width_mult, stem_strides=1,
                     stage_strides=(1, 1, 2, 2, 1, 2, 1), dtype=dtype)
