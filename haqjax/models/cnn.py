"""The conv-BN-activation unit of the zoo, and the small CNNs.

`conv_bn` is the building block every haqjax model uses: a `QConv` (which
takes the policy at call time and looks up its bits by its module path) then
BatchNorm in the `batch_stats` collection. The QConv is named `name` and its
BatchNorm `name + "_bn"`, inside the caller's scope, so a block named
`block3` gives the policy layer `block3/expand`.

Every zoo model has two BN options (fields of `haqjax.models.base.ZooModel`),
read by `conv_bn` from the model (the nearest enclosing module that sets
them), which change neither the variables nor the layer table:

* `fold_bn`: simulated BN folding for QAT (Jacob et al. 2018, section 3.2;
  Krishnamoorthi 2018, section 3.2.2). The weight quantizer sees the folded
  kernel `W * gamma / sqrt(var + eps)` with the running statistics, the one
  `haqjax.ptq.folding.fold_batch_norms` stores and an integer accelerator
  runs; in training the output is corrected to the batch statistics (see
  `haqjax.nn.layers.QConv`). Eval output equals `fold_batch_norms` followed
  by the plain quantized model. Training costs one more (float) convolution
  per layer.
* `freeze_bn_stats`: training uses and keeps the running statistics (no
  batch statistics, no updates), Krishnamoorthi's switch late in QAT.
  Changing it retraces once: `model.clone(freeze_bn_stats=True)`.

The small CNNs:

* `DigitsCNN`: 8x8x1 scikit-learn digits, 3 quantizable layers; ~98% test
  accuracy after 20 epochs of 1,500 images (2 s on a 2-core CPU).
* `QuickstartCNN`: 28x28x1 Fashion-MNIST, the quickstart model that a HAQ
  search assigns bits to; see its docstring for the design and the measured
  throughput and accuracy.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from haqjax.models.base import ZooModel
from haqjax.nn.bn_folding import BN_EPSILON
from haqjax.nn.layers import FoldedBatchNorm
from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.nn.layers import inherited
from haqjax.policy import Policy
from haqjax.typing import Array

BN_MOMENTUM = 0.9


def check_positive(field: str, value: Any, integer: bool = False) -> None:
  """Raises a ValueError unless `value` is a positive number (or integer)."""
  kind = "a positive integer" if integer else "a positive number"
  ok = (isinstance(value, numbers.Integral if integer else numbers.Real)
        and not isinstance(value, bool))
  if not ok or not value > 0:
    raise ValueError(f"{field} is {value!r}; allowed: {kind}")


def conv_bn(x: Array, policy: Policy | None, name: str, features: int,
            kernel_size: int = 3, strides: int = 1, *, train: bool,
            depthwise: bool = False,
            act: Callable[[Array], Array] | None = nn.relu,
            dtype: Any = jnp.float32) -> Array:
  """QConv (bits from `policy`) -> BatchNorm -> `act`, in the caller's scope.

  Must be called inside a `@nn.compact` method. Padding is symmetric
  (`kernel_size // 2` each side, as PyTorch), so a stride-2 layer maps 224 to
  112 and 7 to 4. When the enclosing model sets `fold_bn`, the QConv folds
  the BN into its quantized kernel and returns the BN's output (same
  variables); when it sets `freeze_bn_stats`, training uses the running
  statistics and leaves them unchanged.

  Args:
    x: NHWC input.
    policy: the bit policy, or None for floating point.
    name: the QConv's name (its policy layer name within the caller's path);
      the BatchNorm is `name + "_bn"`.
    features: output channels (equal to the input channels when depthwise).
    kernel_size: square kernel size.
    strides: stride in both spatial dimensions.
    train: use batch statistics and update the running averages (unless
      the model sets `freeze_bn_stats`).
    depthwise: one group per input channel.
    act: activation after BN; None for a linear output.
    dtype: computation dtype.

  Returns:
    The NHWC output.
  """
  pad = kernel_size // 2
  conv = QConv(features, (kernel_size, kernel_size), strides,
               ((pad, pad), (pad, pad)),
               feature_group_count=x.shape[-1] if depthwise else 1,
               dtype=dtype, name=name)
  batch_stats = train and not inherited(conv, "freeze_bn_stats")
  if inherited(conv, "fold_bn"):
    bn = FoldedBatchNorm(features, BN_MOMENTUM, BN_EPSILON, name=f"{name}_bn")
    x = conv(x, policy, bn=bn, train=batch_stats)
  else:
    x = nn.BatchNorm(use_running_average=not batch_stats, momentum=BN_MOMENTUM,
                     epsilon=BN_EPSILON, dtype=dtype, name=f"{name}_bn")(
                         conv(x, policy))
  return x if act is None else act(x)


class DigitsCNN(ZooModel):
  """A 3-layer CNN for 8x8x1 digits: conv 1->16, conv 16->32 /2, GAP, dense.

  Attributes:
    num_classes: classifier outputs.
    width: channels of the first conv (the second has twice as many).
  """
  num_classes: int = 10
  width: int = 16

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None = None,
               train: bool = False) -> Array:
    kw = dict(train=train, dtype=self.dtype)
    x = conv_bn(x, policy, "stem", self.width, 3, **kw)          # 8x8
    x = conv_bn(x, policy, "conv1", 2 * self.width, 3, 2, **kw)  # 4x4
    x = jnp.mean(x, axis=(1, 2))
    x = QDense(self.num_classes, dtype=self.dtype, name="classifier")(x, policy)
    return x.astype(jnp.float32)


# QuickstartCNN layers: (name, output channels, kernel, stride). Maps are for a
# 28x28 input.
QUICKSTART_LAYERS = (
    ("stem", 16, 3, 2),   # 28x28x1  -> 14x14x16
    ("conv1", 32, 3, 1),  # 14x14x16 -> 14x14x32
    ("conv2", 48, 3, 2),  # 14x14x32 -> 7x7x48
    ("conv3", 64, 1, 1),  # 7x7x48   -> 7x7x64
    ("conv4", 64, 3, 2),  # 7x7x64   -> 4x4x64
    ("conv5", 128, 1, 1),  # 4x4x64  -> 4x4x128
)


class QuickstartCNN(ZooModel):
  """The quickstart CNN for 28x28x1 Fashion-MNIST (7 quantizable layers).

  Conv-BN-ReLU layers of different shapes (3x3 and 1x1, stride 1 and 2, 16 to
  128 channels), global average pooling and a dense classifier, so a HAQ
  search has layers with different costs and sensitivities to trade. See
  `QUICKSTART_LAYERS`.

  The design is set by CPU training speed. XLA:CPU runs convolution backward
  passes at about a third of the forward speed, so compute is kept small
  (2.5M MACs per image) and a stride-2 stem avoids full-resolution maps
  (a stride-1 stem halves the throughput). Depthwise convolutions, which
  XLA:CPU lowers to grouped convolutions ~10x slower per MAC than dense ones,
  are left out: one 3x3 depthwise layer on the 7x7x64 map alone cuts training
  throughput from ~3,600 to ~1,400 images/s.

  Measured on a 2-core CPU: ~4,000 images/s per training step (SGD with
  momentum, batch 128, float32); with `experiments/flags/quickstart.flags`
  (10 epochs) 92.3% Fashion-MNIST test top-1 after 155 s of training.

  Attributes:
    num_classes: classifier outputs.
    width_mult: multiplies every layer's channels (rounded, at least 1).
  """
  num_classes: int = 10
  width_mult: float = 1.0

  @nn.compact
  def __call__(self, x: Array, policy: Policy | None = None,
               train: bool = False) -> Array:
    for name, features, k, s in QUICKSTART_LAYERS:
      x = conv_bn(x, policy, name, max(1, round(features * self.width_mult)),
                  k, s, train=train, dtype=self.dtype)
    x = jnp.mean(x, axis=(1, 2))
    x = QDense(self.num_classes, dtype=self.dtype, name="classifier")(x, policy)
    return x.astype(jnp.float32)


def digits_cnn(num_classes: int = 10, dtype: Any = jnp.float32) -> DigitsCNN:
  """The 3-layer CNN for 8x8x1 digits."""
  return DigitsCNN(num_classes, dtype=dtype)


def quickstart_cnn(num_classes: int = 10, width_mult: float = 1.0,
                   dtype: Any = jnp.float32) -> QuickstartCNN:
  """The 7-layer quickstart CNN for 28x28x1 Fashion-MNIST."""
  check_positive("width_mult", width_mult)
  return QuickstartCNN(num_classes, width_mult, dtype=dtype)
