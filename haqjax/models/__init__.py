"""The model zoo: every model is built from haqjax layers, so each conv,
depthwise conv and dense layer takes its own bits from the policy.

Every model is a flax linen module called as `model.apply(variables, x,
policy=None, train=False)` on NHWC float images; it returns float32 logits.
BatchNorm statistics live in the `batch_stats` collection (pass
`mutable=["batch_stats"]` when `train=True`). Every model subclasses
`ZooModel`, which declares the fields they share (`dtype`, `quant_scheme`,
`fold_bn`, `freeze_bn_stats`). Layer names (module paths such
as `block3/expand` or `layer2_0/downsample`) are the policy's names::

    model = haqjax.models.create("mobilenet_v2", num_classes=1000, width_mult=0.5)
    table = haqjax.layer_table(model, (1, *haqjax.models.INPUT_SHAPES["mobilenet_v2"]))
    policy = haqjax.Policy.uniform(table.names, w_bits=4, a_bits=4)
    logits = model.apply(variables, images, policy=policy, train=False)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from haqjax.models.base import MODEL_OPTIONS
from haqjax.models.base import ZooModel
from haqjax.models.cnn import DigitsCNN
from haqjax.models.cnn import QuickstartCNN
from haqjax.models.cnn import check_positive
from haqjax.models.cnn import conv_bn
from haqjax.models.cnn import digits_cnn
from haqjax.models.cnn import quickstart_cnn
from haqjax.models.mobilenet import InvertedResidual
from haqjax.models.mobilenet import MobileNetV1
from haqjax.models.mobilenet import MobileNetV2
from haqjax.models.mobilenet import make_divisible
from haqjax.models.mobilenet import mobilenet_v1
from haqjax.models.mobilenet import mobilenet_v2
from haqjax.models.mobilenet import mobilenet_v2_small
from haqjax.models.resnet import BasicBlock
from haqjax.models.resnet import Bottleneck
from haqjax.models.resnet import CifarResNet
from haqjax.models.resnet import ResNet
from haqjax.models.resnet import resnet18
from haqjax.models.resnet import resnet20
from haqjax.models.resnet import resnet50
from haqjax.models.resnet import resnet_small

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "quickstart_cnn": quickstart_cnn,
    "mobilenet_v1": mobilenet_v1,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_small": mobilenet_v2_small,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet20": resnet20,
    "resnet_small": resnet_small,
}
MODELS = tuple(_FACTORIES)

# The input each model is designed for, (height, width, channels). The
# networks are fully convolutional, so other sizes run too; resnet_small and
# mobilenet_v2_small take 28x28x1 as well as 32x32x3.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits_cnn": (8, 8, 1),
    "quickstart_cnn": (28, 28, 1),
    "mobilenet_v1": (224, 224, 3),
    "mobilenet_v2": (224, 224, 3),
    "mobilenet_v2_small": (32, 32, 3),
    "resnet18": (224, 224, 3),
    "resnet50": (224, 224, 3),
    "resnet20": (32, 32, 3),
    "resnet_small": (32, 32, 3),
}


def create(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds model `name` with `num_classes` outputs.

  Args:
    name: one of `MODELS`.
    num_classes: classifier outputs.
    **kwargs: the model's options (e.g. width_mult, depth, dtype); see its
      factory function (`mobilenet_v2`, `resnet_small`, ...). Every model
      also takes `quant_scheme` (a `haqjax.quant.QuantScheme`: the weight and
      activation quantizers of each layer), `fold_bn` (QAT on BN-folded
      kernels) and `freeze_bn_stats` (train with the running BN
      statistics), the keyword-only fields of `ZooModel`.

  Returns:
    The (unbound) flax module.

  Raises:
    ValueError: unknown model, an option the model does not take, or a bad
      value.
  """
  if name not in _FACTORIES:
    raise ValueError(f"model {name!r} is unknown; allowed: {', '.join(MODELS)}")
  check_positive("num_classes", num_classes, integer=True)
  factory = _FACTORIES[name]
  common = {k: kwargs.pop(k) for k in MODEL_OPTIONS if k in kwargs}
  for field in ("fold_bn", "freeze_bn_stats"):
    if not isinstance(common.get(field, False), bool):
      raise ValueError(f"{field} is {common[field]!r}; allowed: True or False")
  accepted = set(inspect.signature(factory).parameters) - {"num_classes"}
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise ValueError(f"model {name!r} does not take {', '.join(unknown)}; "
                     f"allowed: {', '.join(sorted(accepted))}")
  model = factory(num_classes=num_classes, **kwargs)
  return model.clone(**common) if common else model
