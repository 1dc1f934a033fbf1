"""The fields every zoo model shares: its dtype and the model-wide options.

Each zoo model (`DigitsCNN`, `QuickstartCNN`, `MobileNetV1`, `MobileNetV2`,
`ResNet`, `CifarResNet`) subclasses `ZooModel`, which declares them once.
The layers read the options from the nearest enclosing module that sets
them (`haqjax.nn.layers.inherited`), so the blocks between the model and its
layers do not pass them on. They are keyword-only, after each model's own
fields, and they change neither the variables nor the layer table::

    model = haqjax.models.create("resnet_small", num_classes=10, fold_bn=True)
    model = model.clone(freeze_bn_stats=True)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# The options `haqjax.models.create` takes for every model, beside its
# factory's keywords.
MODEL_OPTIONS = ("quant_scheme", "fold_bn", "freeze_bn_stats")


class ZooModel(nn.Module):
  """Base of the zoo models: computation dtype and model-wide options.

  Attributes:
    dtype: computation dtype; parameters stay float32, logits are float32.
    quant_scheme: a `haqjax.quant.QuantScheme`, the weight and activation
      quantizers of each layer; None: min-max fake-quant.
    fold_bn: QAT on BN-folded kernels (see `haqjax.models.cnn.conv_bn`).
    freeze_bn_stats: train with the running BN statistics, without updating
      them.
  """
  _: dataclasses.KW_ONLY
  dtype: Any = jnp.float32
  quant_scheme: Any = None
  fold_bn: bool = False
  freeze_bn_stats: bool = False
