"""ResNets (He et al. 2016) built from quantizable layers.

Two families share the residual blocks:

* `ResNet`: the ImageNet networks (ResNet-18/34 with basic blocks,
  ResNet-50/101/152 with bottlenecks) for 224x224 inputs. The stem is a 7x7/2
  convolution and a 3x3/2 max pool; a bottleneck strides on its 3x3
  convolution ("ResNet v1.5", as torchvision). Parameter counts equal
  torchvision's (ResNet-18: 11,689,512; ResNet-50: 25,557,032 at 1000
  classes).
* `CifarResNet`: the 6n+2-layer networks for 32x32 CIFAR images (ResNet-20 is
  n=3: three stages of three basic blocks with 16, 32 and 64 channels), also
  used at 28x28x1. The stem is one 3x3/1 convolution that adapts to the input
  channels.

Shortcuts that change shape are a 1x1 convolution + BN (He et al.'s option B)
in both families. The CIFAR paper used option A (zero-padded identity, no
parameters); option B makes the downsample a quantizable layer that gets its
own bits, as in the ImageNet nets. ResNet-20 with option B has 272,474
parameters at 10 classes (option A: 269,722).

Layer names (the policy's names) are `stem`, `layer{s}_{b}/conv{1,2,3}`,
`layer{s}_{b}/downsample` and `fc`, with stages `s` from 1 and blocks `b`
from 0, as torchvision's `layer2.0.conv1`.

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
  https://arxiv.org/abs/1512.03385
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from haqjax.models.base import ZooModel
from haqjax.models.cnn import conv_bn
from haqjax.nn.layers import QDense
from haqjax.policy import Policy
from haqjax.typing import Array


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (expansion 1).

  Attributes:
    features: output channels.
    strides: stride of the first convolution and of the shortcut.
    dtype: computation dtype.
  """
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None, train: bool) -> Array:
    kw = dict(train=train, dtype=self.dtype)
    y = conv_bn(x, policy, "conv1", self.features, 3, self.strides, **kw)
    y = conv_bn(y, policy, "conv2", self.features, 3, act=None, **kw)
    return nn.relu(y + _shortcut(x, policy, self.features, self.strides, **kw))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4, with a residual.

  Attributes:
    features: channels of the 3x3 convolution; the block outputs 4x as many.
    strides: stride of the 3x3 convolution and of the shortcut.
    dtype: computation dtype.
  """
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None, train: bool) -> Array:
    kw = dict(train=train, dtype=self.dtype)
    out = self.features * self.expansion
    y = conv_bn(x, policy, "conv1", self.features, 1, **kw)
    y = conv_bn(y, policy, "conv2", self.features, 3, self.strides, **kw)
    y = conv_bn(y, policy, "conv3", out, 1, act=None, **kw)
    return nn.relu(y + _shortcut(x, policy, out, self.strides, **kw))


def _shortcut(x: Array, policy: Policy | None, features: int, strides: int, *,
              train: bool, dtype: Any) -> Array:
  """Identity, or a 1x1 conv + BN (option B) when the shape changes."""
  if strides == 1 and x.shape[-1] == features:
    return x
  return conv_bn(x, policy, "downsample", features, 1, strides, act=None,
                 train=train, dtype=dtype)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _stages(x: Array, policy: Policy | None, train: bool, block: str,
            stage_sizes: Sequence[int], widths: Sequence[int],
            dtype: Any) -> Array:
  block_cls = _BLOCKS[block]
  for s, (n, width) in enumerate(zip(stage_sizes, widths)):
    for b in range(n):
      strides = 2 if s > 0 and b == 0 else 1
      x = block_cls(width, strides, dtype, name=f"layer{s + 1}_{b}")(
          x, policy, train)
  return x


def _check_block(block: str) -> None:
  if block not in _BLOCKS:
    raise ValueError(f"block is {block!r}; allowed: {', '.join(_BLOCKS)}")


class ResNet(ZooModel):
  """ImageNet ResNet: 7x7/2 stem, 3x3/2 max pool, four stages, GAP, fc.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: 'basic' or 'bottleneck'.
    num_classes: classifier outputs.
    width: channels of the first stage (doubled per stage).
  """
  stage_sizes: Sequence[int]
  block: str = "basic"
  num_classes: int = 1000
  width: int = 64

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None = None,
               train: bool = False) -> Array:
    _check_block(self.block)
    x = conv_bn(x, policy, "stem", self.width, 7, 2, train=train,
                dtype=self.dtype)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    widths = [self.width * 2**i for i in range(len(self.stage_sizes))]
    x = _stages(x, policy, train, self.block, self.stage_sizes, widths,
                self.dtype)
    x = jnp.mean(x, axis=(1, 2))
    x = QDense(self.num_classes, dtype=self.dtype, name="fc")(x, policy)
    return x.astype(jnp.float32)


class CifarResNet(ZooModel):
  """CIFAR ResNet (6n+2 layers): 3x3/1 stem, three stages, GAP, fc.

  Attributes:
    stage_sizes: basic blocks per stage; (3, 3, 3) is ResNet-20.
    num_classes: classifier outputs.
    widths: channels per stage.
  """
  stage_sizes: Sequence[int] = (3, 3, 3)
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None = None,
               train: bool = False) -> Array:
    x = conv_bn(x, policy, "stem", self.widths[0], 3, train=train,
                dtype=self.dtype)
    x = _stages(x, policy, train, "basic", self.stage_sizes, self.widths,
                self.dtype)
    x = jnp.mean(x, axis=(1, 2))
    x = QDense(self.num_classes, dtype=self.dtype, name="fc")(x, policy)
    return x.astype(jnp.float32)


def resnet18(num_classes: int = 1000, dtype: Any = jnp.float32) -> ResNet:
  """ResNet-18 for 224x224 images (11,689,512 parameters at 1000 classes)."""
  return ResNet((2, 2, 2, 2), "basic", num_classes, dtype=dtype)


def resnet50(num_classes: int = 1000, dtype: Any = jnp.float32) -> ResNet:
  """ResNet-50 v1.5 for 224x224 images (25,557,032 parameters at 1000 classes)."""
  return ResNet((3, 4, 6, 3), "bottleneck", num_classes, dtype=dtype)


def resnet20(num_classes: int = 10, dtype: Any = jnp.float32) -> CifarResNet:
  """ResNet-20 for 32x32x3 CIFAR images (272,474 parameters at 10 classes)."""
  return CifarResNet((3, 3, 3), num_classes, (16, 32, 64), dtype=dtype)


def resnet_small(num_classes: int = 10, depth: int = 20, width_mult: float = 1.0,
                 dtype: Any = jnp.float32) -> CifarResNet:
  """A CIFAR-style ResNet of any depth 6n+2 and width for 28x28 or 32x32 inputs.

  The stem adapts to the input channels (1 for Fashion-MNIST, 3 for CIFAR);
  `depth=20, width_mult=1` is ResNet-20. Smaller depths (8, 14) train fast on
  a CPU.

  Args:
    num_classes: classifier outputs.
    depth: total depth, 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110).
    width_mult: multiplies the stage widths 16/32/64 (rounded, at least 1).
    dtype: computation dtype.

  Raises:
    ValueError: if depth is not 6n+2 or width_mult is not positive.
  """
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"depth is {depth!r}; allowed: 6n+2 with n >= 1 "
                     "(8, 14, 20, 32, 44, 56, 110)")
  if not width_mult > 0:
    raise ValueError(f"width_mult is {width_mult!r}; allowed: a positive number")
  n = (depth - 2) // 6
  widths = tuple(max(1, round(w * width_mult)) for w in (16, 32, 64))
  return CifarResNet((n, n, n), num_classes, widths, dtype=dtype)
