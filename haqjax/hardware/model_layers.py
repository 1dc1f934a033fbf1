"""The GEMM view of a haqjax network: `Layers` from a layer table or a model.

The cost models read only the shape arrays of `haqjax.hardware.Layers`; this
module is the one place in `haqjax.hardware` that knows where those shapes
come from in `haqjax.nn` and `haqjax.models`. Other sources (a SCALE-Sim
topology file, shapes typed in by hand) go through `make_layers` directly.

Example::

    table = haqjax.nn.layer_table(model, (1, 224, 224, 3))
    layers = haqjax.hardware.from_layer_table(table, batch=16)
    layers = haqjax.hardware.from_model("mobilenet_v2", num_classes=100, batch=16)
"""

from __future__ import annotations

from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import make_layers
from haqjax.nn.table import LayerTable


def from_layer_table(table: LayerTable, batch: int = 1) -> Layers:
  """The GEMM view of a `haqjax.nn.LayerTable` at batch size `batch`."""
  return make_layers(
      names=table.names, in_channels=table.in_channels,
      out_channels=table.out_channels, kernel_h=table.kernel_h,
      kernel_w=table.kernel_w, groups=table.groups, in_h=table.in_h,
      in_w=table.in_w, out_h=table.out_h, out_w=table.out_w, batch=batch,
      depthwise=table.is_depthwise, biases=table.params - table.weight_count)


def from_model(name: str, *, input_size: int | None = None,
               num_classes: int = 1000, batch: int = 1) -> Layers:
  """The GEMM view of a model of `haqjax.models` (e.g. 'mobilenet_v2')."""
  from haqjax import models  # pylint: disable=g-import-not-at-top
  from haqjax.nn.table import layer_table  # pylint: disable=g-import-not-at-top
  key = name.replace("mobilenetv", "mobilenet_v")
  if key not in models.MODELS:
    raise ValueError(f"model is {name!r}; allowed: {', '.join(models.MODELS)}")
  h, w, c = models.INPUT_SHAPES[key]
  if input_size is not None:
    if input_size < 1:
      raise ValueError(f"input_size is {input_size}; allowed: a positive integer")
    h = w = input_size
  model = models.create(key, num_classes=num_classes)
  return from_layer_table(layer_table(model, (1, h, w, c)), batch=batch)
