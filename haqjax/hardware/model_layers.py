"""The GEMM view of a haqjax network: `Layers` from a layer table or a model.

The cost models read only the shape arrays of `haqjax.hardware.Layers`; this
module is the one place in `haqjax.hardware` that knows where those shapes
come from in `haqjax.nn` and `haqjax.models`. Other sources (a SCALE-Sim
topology file, shapes typed in by hand) go through `make_layers` directly.

A matmul of two activations (layer kind 'matmul', e.g. attention's
queries x keys) is a GEMM without weights: each example multiplies its own
operands, so its `G` products per example become `batch * G` groups of
`[M, K] x [K, N]` (M: the table's `in_h`), `weights` is 0 (the model
stores nothing: size 0 at any bits) and `biases` 0. Its second operand
takes the `w_bits` a kernel would: BISMO and the systolic array's on-chip
traffic stream it at those bits, BitOps are `MACs * w * a`, and the DRAM
models read it as they read a kernel (`Layers.rhs_elems`: per example, once
per batch element).

Strides: the table's stride reaches `Layers.stride`, so the systolic
scratchpads follow a conv's im2col addresses (`Layers.conv_geometry`) as
they do for a SCALE-Sim topology. SCALE-Sim's IFMAP is the padded input and
a side has `ceil((H - R + s) / s)` outputs; a model's conv (SAME, VALID or
any padding under the kernel) with `out` outputs a side reads the extent
`(out - 1) s + R` of its padded input, the IFMAP that gives SCALE-Sim the
same `out` with no output reading past it (SAME: `H` plus its padding;
VALID: `H` less the rows no window reaches). `Layers.in_h` and `in_w` hold
this extent; `in_elems` keeps the unpadded input. The table keeps one
stride and no dilation: where its sizes fit no such padding (`read_extent`:
strides that differ between the sides, most convs of another rank folded
into two sides) the stride is left unknown (0); a dilated SAME conv reads as
its undilated twin. A dense layer or matmul is a 1 x 1 "conv" of stride 1.

Example::

    table = haqjax.nn.layer_table(model, (1, 224, 224, 3))
    layers = haqjax.hardware.from_layer_table(table, batch=16)
    layers = haqjax.hardware.from_model("mobilenet_v2", num_classes=100, batch=16)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import make_layers
from haqjax.nn.table import KINDS
from haqjax.nn.table import LayerTable


def from_layer_table(table: LayerTable, batch: int = 1) -> Layers:
  """The GEMM view of a `haqjax.nn.LayerTable` at batch size `batch`.

  Raises:
    ValueError: a layer kind outside `haqjax.nn.table.KINDS`.
  """
  for i, kind in enumerate(table.kinds):
    if kind not in KINDS:
      raise ValueError(f"kind of layer {i} ({table.names[i]!r}) is {kind!r}; "
                       f"allowed: {', '.join(KINDS)}")
  extent_h, fits_h = read_extent(table.in_h, table.out_h, table.kernel_h, table.stride)
  extent_w, fits_w = read_extent(table.in_w, table.out_w, table.kernel_w, table.stride)
  known = fits_h & fits_w
  layers = make_layers(
      names=table.names, in_channels=table.in_channels,
      out_channels=table.out_channels, kernel_h=table.kernel_h,
      kernel_w=table.kernel_w, groups=table.groups, in_h=table.in_h,
      in_w=table.in_w, out_h=table.out_h, out_w=table.out_w, batch=batch,
      depthwise=table.is_depthwise, biases=table.params - table.weight_count,
      stride=np.where(known, table.stride, 0))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  layers = layers.replace(in_h=f32(np.where(known, extent_h, table.in_h)),
                          in_w=f32(np.where(known, extent_w, table.in_w)))
  matmul = np.array([k == "matmul" for k in table.kinds])
  if not matmul.any():
    return layers
  mm = jnp.asarray(matmul)
  per_example = lambda field, value: jnp.where(mm, value, getattr(layers, field))
  return layers.replace(m=per_example("m", layers.m / batch),
                        groups=per_example("groups", layers.groups * batch),
                        weights=per_example("weights", 0.0),
                        biases=per_example("biases", 0.0))


def read_extent(size: np.ndarray, out: np.ndarray, kernel: np.ndarray,
                stride: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The padded input a conv's `out` outputs of one side read, and whether it fits.

  Args:
    size: the unpadded input side `H` per layer.
    out, kernel, stride: the side's outputs, kernel side `R` and stride `s`.

  Returns:
    `(extent, fits)`: `(out - 1) s + R`, SCALE-Sim's IFMAP side that gives
    `out` outputs; `fits` where a padding of at most `R - 1` in all (SAME's
    at most, VALID's none) turns `H` into an input with `out` outputs at
    stride `s`: `H - s < extent <= H + R - 1`.
  """
  size, out, kernel, stride = (np.asarray(x, np.int64) for x in (size, out, kernel, stride))
  extent = (out - 1) * stride + kernel
  fits = (stride > 0) & (extent > size - stride) & (extent <= size + kernel - 1)
  return extent, fits


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
