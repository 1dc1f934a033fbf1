"""ONNX export of an integer graph in QDQ form (`model.onnx`).

Each tensor of the `Graph` becomes the float tensor of its real values,
named as the node; integers appear where a runtime needs them:

* codes (bits <= 8): `QuantizeLinear` (scale, zero point of dtype int8 or
  uint8) -> `Clip` of the codes to `[lo, hi]` when that is narrower than the
  dtype (a sub-8-bit grid, a ReLU/ReLU6 clamp: Brevitas' QCDQ form) ->
  `DequantizeLinear`;
* integer layers: float `Conv` / `Gemm` on the dequantized input, an int8
  weight initializer (OIHW for `Conv`, transposed from haqjax's HWIO) through
  a per-channel `DequantizeLinear` (axis 0 for `Conv`, 1 for `Gemm`'s
  `[K, C]`), and the int32 bias through `DequantizeLinear` at the
  accumulator's scale, added by an `Add` after the op (as the op's bias
  input, onnxruntime's QDQ fusion would read it at `s_x * s_w`). The
  weight's dequantization scale is the accumulator scale (times
  `2^acc_shift` where the products are shifted before the bias joins them)
  over the input scale, so a folded BatchNorm multiplier (negative for a
  negative gamma) is in it;
* int32 tensors (residual streams, pooled sums): `Div` by the scale,
  `Round`, `Clip`, `Mul` back: `QuantizeLinear` has no int32 output.

`max_pool` is `MaxPool`, `mean` is `GlobalAveragePool` then `Flatten`,
`reshape` is `Reshape` (on NHWC order), float layers are `Conv`/`MatMul`,
`Mul`, `Add`, `Clip`. Opset 13 (per-axis `QuantizeLinear` needs it).

`export_all` writes the whole deployment bundle: `model.onnx`, `encodings.json`
(`haqjax.deploy.encodings`), `weights.bin` (`haqjax.deploy.packing`) and,
given the engine's function, `model.stablehlo` (`haqjax.deploy.stablehlo`).

Layout: the model takes the same NHWC float images as haqjax (batch axis
symbolic, 'N') and transposes them to NCHW inside; 4-d tensors are NCHW
within the model; 4-d outputs are transposed back to NHWC.

The model is not bit-exact with the integer engine. Between `Q` and `DQ`
the runtime computes in float32 (onnxruntime fuses some patterns into
`QLinearConv` / `QGemm`, which requantize in float as well), and
`QuantizeLinear` rounds `real / scale` once, half to even. A `requantize`
with TFLite's single rounding (`rounding='single'`: the exact product
rounded once, half up) then agrees except at exact ties and where a value
lies within float32 rounding of a half (float32 holds integers exactly only
up to 2^24, short of the wide int32 tensors); gemmlowp's rounding
(`'gemmlowp'`: `v * m / 2^31` rounded, then the right shift by `R` bits,
ties away from zero) disagrees by one code on about `2^-(R + 1)` of the
values it does not clamp. `quantize` (which multiplies by `inv_scale` where
`QuantizeLinear` divides), `clamp`, `max_pool`, `mean`, `add` and `reshape`
agree exactly but for float32 near-ties. The tests bound each op and
measure the logits against the engine.

References:
  ONNX operators QuantizeLinear, DequantizeLinear (opset 13),
  https://onnx.ai/onnx/operators/
  Pappalardo et al., "QONNX: Representing Arbitrary-Precision Quantized
  Neural Networks", 2022 (the QCDQ form).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from haqjax.deploy.encodings import save_encodings
from haqjax.deploy.graph import Encoding
from haqjax.deploy.graph import Graph
from haqjax.deploy.graph import Node
from haqjax.deploy.packing import graph_weights
from haqjax.deploy.packing import save_packed
from haqjax.deploy.stablehlo import save_stablehlo
from haqjax.io import atomic_open

OPSET = 13
_DTYPE_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}
_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)


class _Builder:
  """Accumulates ONNX nodes and initializers; tracks each tensor's rank."""

  def __init__(self, graph: Graph):
    from onnx import helper  # pylint: disable=g-import-not-at-top
    self.helper = helper
    self.graph = graph
    self.nodes: list[Any] = []
    self.inits: list[Any] = []
    self.rank: dict[str, int] = {}  # ONNX tensor -> rank (4: NCHW)
    self.value: dict[str, str] = {}  # graph tensor -> ONNX tensor
    self.count = 0

  def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
    self.count += 1
    name = f"{hint}:c{self.count}"
    self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name

  def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
    self.nodes.append(self.helper.make_node(op_type, inputs, [output], name=output, **attrs))
    if inputs[0] in self.rank:  # Most ops keep the rank; `add` corrects the others.
      self.rank.setdefault(output, self.rank[inputs[0]])
    return output

  def channels(self, name: str, value: np.ndarray) -> np.ndarray:
    """A per-channel `[C]` array shaped to broadcast over tensor `name`."""
    return value.reshape((-1, 1, 1)) if self.rank[name] == 4 else value

  def to_grid(self, x: str, enc: Encoding, lo: Any, hi: Any, out: str) -> str:
    """Snaps real tensor `x` to `enc`'s grid clipped to codes [lo, hi]."""
    lo, hi = int(lo), int(hi)
    if enc.is_wide:
      if enc.zero_point:
        raise ValueError(f"tensor {out!r}: int32 zero point is {enc.zero_point}; allowed: 0")
      scale = self.channels(x, np.atleast_1d(enc.scale)) if enc.axis is not None else enc.scale
      s = self.const(out, scale)
      q = self.op("Round", [self.op("Div", [x, s], f"{out}:div")], f"{out}:round")
      q = self.op("Clip", [q, self.const(out, lo), self.const(out, hi)], f"{out}:clip")
      return self.op("Mul", [q, s], out)
    dtype = np.dtype(enc.dtype)
    axis = {} if enc.axis is None else {"axis": 1}
    s, z = self.const(out, enc.scale), self.const(out, np.full(enc.scale.shape, enc.zero_point), dtype)
    q = self.op("QuantizeLinear", [x, s, z], f"{out}:q", **axis)
    if (lo, hi) != _DTYPE_RANGE[enc.dtype]:
      q = self.op("Clip", [q, self.const(out, lo, dtype), self.const(out, hi, dtype)],
                  f"{out}:clip")
    return self.op("DequantizeLinear", [q, s, z], out, **axis)

  def layer(self, node: Node, x: str) -> str:
    """An integer conv or dense layer: float op on DQ'd int8 weights and bias."""
    in_enc = self.graph.encoding(node.inputs[0])
    if in_enc is None or in_enc.is_wide or in_enc.axis is not None:
      raise ValueError(f"layer {node.name!r} reads {node.inputs[0]!r}; allowed: "
                       "per-tensor codes")
    acc_scale = np.broadcast_to(node.encoding.scale, node.arrays["bias"].shape)
    weight = node.arrays["weight"]
    conv = node.op == "conv"
    if conv:
      weight = weight.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    # The products are shifted left by `acc_shift` (when the graph has one)
    # before the bias joins them, so a weight code is worth 2^acc_shift steps.
    shift = np.float64(2.0) ** int(node.arrays.get("acc_shift", 0))
    w_scale = (acc_scale * shift / in_enc.scale).astype(np.float32)
    zeros = np.zeros(acc_scale.shape, np.int8)
    w = self.op("DequantizeLinear", [
        self.const(node.name, weight, np.int8), self.const(node.name, w_scale),
        self.const(node.name, zeros, np.int8)], f"{node.name}/kernel", axis=0 if conv else 1)
    # The bias is added after the float op, not given as its bias input:
    # onnxruntime fuses DQ -> Gemm (or Conv) with a DQ'd int32 bias into
    # QGemm (QLinearConv), which reads the bias codes at the scale
    # `s_x * s_w`, 2^acc_shift times the accumulator's.
    bias = node.arrays["bias"].reshape((-1, 1, 1) if conv else (-1,))
    b = self.op("DequantizeLinear", [
        self.const(node.name, bias, np.int32), self.const(node.name, acc_scale),
        self.const(node.name, zeros, np.int32)], f"{node.name}/bias", axis=0)
    if conv:
      y = self.op("Conv", [x, w], f"{node.name}:conv", **_conv_attrs(node, weight.shape[2:]))
    else:
      y = self.op("Gemm", [x, w], f"{node.name}:gemm")
    return self.op("Add", [y, b], node.name)

  def float_layer(self, node: Node, x: str) -> str:
    arrays = node.arrays
    if node.op == "float_conv":
      kernel = arrays["kernel"].transpose(3, 2, 0, 1)
      y = self.op("Conv", [x, self.const(node.name, kernel)], f"{node.name}:conv",
                  **_conv_attrs(node, kernel.shape[2:]))
    else:
      y = self.op("MatMul", [x, self.const(node.name, arrays["kernel"])], f"{node.name}:matmul")
    y = self.op("Mul", [y, self.const(node.name, self.channels(y, arrays["mul"]))],
                f"{node.name}:mul")
    y = self.op("Add", [y, self.const(node.name, self.channels(y, arrays["bias"]))],
                f"{node.name}:add")
    lo, hi = (float(arrays[k]) for k in ("lo", "hi"))
    bounds = [self.const(node.name, lo) if np.isfinite(lo) else "",
              self.const(node.name, hi) if np.isfinite(hi) else ""]
    return self.op("Clip", [y, *bounds], node.name)

  def reshape(self, node: Node, x: str) -> str:
    shape = tuple(node.attrs["shape"])
    if self.rank[x] == 4:
      x = self.op("Transpose", [x], f"{node.name}:nhwc", perm=_NCHW_TO_NHWC)
    target = self.const(node.name, (0, *shape), np.int64)
    if len(shape) != 3:
      return self.op("Reshape", [x, target], node.name)
    y = self.op("Reshape", [x, target], f"{node.name}:nhwc_out")
    return self.op("Transpose", [y], node.name, perm=_NHWC_TO_NCHW)

  def add(self, node: Node) -> None:
    """Translates `node`; its real values become the ONNX tensor `value[name]`."""
    x = self.value[node.inputs[0]]
    rank = self.rank[x]
    if node.op == "reshape":
      rank = 1 + len(node.attrs["shape"])
    elif node.op in ("mean", "dense", "float_dense"):
      rank = 2
    out = self.translate(node, x)
    self.value[node.name] = out
    self.rank[out] = rank

  def translate(self, node: Node, x: str) -> str:
    arrays, enc, name = node.arrays, node.encoding, node.name
    if node.op in ("quantize", "requantize", "clamp"):
      return self.to_grid(x, enc, arrays["lo"], arrays["hi"], name)
    if node.op == "add":
      y = self.op("Add", [self.value[i] for i in node.inputs], f"{name}:sum")
      return self.to_grid(y, enc, arrays["lo"], arrays["hi"], name)
    if node.op == "dequantize":
      return self.op("Identity", [x], name)
    if node.op in ("conv", "dense"):
      return self.layer(node, x)
    if node.op in ("float_conv", "float_dense"):
      return self.float_layer(node, x)
    if node.op == "max_pool":
      if np.any(enc.scale < 0):
        raise ValueError(f"max_pool {name!r} has a negative scale; allowed: scale >= 0")
      return self.op("MaxPool", [x], name, kernel_shape=list(node.attrs["window"]),
                     **_window_attrs(node))
    if node.op == "mean":
      y = self.op("GlobalAveragePool", [x], f"{name}:pool")
      return self.op("Flatten", [y], name, axis=1)
    if node.op == "reshape":
      return self.reshape(node, x)
    raise ValueError(f"node {name!r}: op {node.op!r} has no ONNX translation")


def _window_attrs(node: Node) -> dict[str, Any]:
  (top, bottom), (left, right) = node.attrs["padding"]
  return {"strides": list(node.attrs["strides"]), "pads": [top, left, bottom, right]}


def _conv_attrs(node: Node, kernel_hw: tuple[int, ...]) -> dict[str, Any]:
  return {"kernel_shape": list(kernel_hw), "group": int(node.attrs["groups"]),
          **_window_attrs(node)}


def to_onnx(graph: Graph) -> Any:
  """The `onnx.ModelProto` of `graph` (see the module docstring).

  Raises:
    ValueError: an op or encoding the QDQ form cannot express.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import TensorProto  # pylint: disable=g-import-not-at-top
  b = _Builder(graph)
  shape = ["N", *graph.input_shape]
  x = graph.input
  if len(shape) == 4:
    x = b.op("Transpose", [graph.input], f"{graph.input}:nchw", perm=_NHWC_TO_NCHW)
  b.value[graph.input], b.rank[x] = x, len(shape)
  for node in graph.nodes:
    b.add(node)
  out = b.value[graph.output]
  if b.rank[out] == 4:
    out = b.op("Transpose", [out], f"{graph.output}:nhwc", perm=_NCHW_TO_NHWC)
  helper = b.helper
  model = helper.make_model(
      helper.make_graph(
          b.nodes, "haqjax",
          [helper.make_tensor_value_info(graph.input, TensorProto.FLOAT, shape)],
          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
          initializer=b.inits),
      opset_imports=[helper.make_opsetid("", OPSET)], producer_name="haqjax")
  model.ir_version = 7
  # The output's shape (e.g. [N, classes]) as ONNX's shape inference finds it.
  inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
  model.graph.output[0].type.CopyFrom(inferred.graph.output[0].type)
  onnx.checker.check_model(model, full_check=True)
  return model


def save_onnx(path: str | os.PathLike, graph: Graph) -> int:
  """Writes `to_onnx(graph)` to `path` atomically; returns its size in bytes."""
  data = to_onnx(graph).SerializeToString()
  with atomic_open(path, "wb") as f:
    f.write(data)
  return len(data)


def export_all(graph: Graph, workdir: str | os.PathLike,
               engine_fn: Callable[[Any], Any] | None = None) -> dict[str, int]:
  """Writes the deployment files of `graph` to `workdir/export/`, each atomically.

  Args:
    graph: the integer graph.
    workdir: the run's folder; the files go to its `export/` subfolder.
    engine_fn: the integer engine's function of a float NHWC batch
      (`[N, *graph.input_shape]`); serialized with a symbolic batch axis to
      `model.stablehlo`. None: no StableHLO file.

  Returns:
    File name -> size in bytes, for the files written: `model.onnx` (left out,
    with a warning, when the `onnx` package is missing: install the `export`
    extra), `model.stablehlo`, `encodings.json`, `weights.bin`.
  """
  folder = os.path.join(os.fspath(workdir), "export")
  sizes = {}
  if importlib.util.find_spec("onnx") is None:
    logging.warning("model.onnx not written: the onnx package is missing "
                    "(pip install haqjax[export])")
  else:
    sizes["model.onnx"] = save_onnx(os.path.join(folder, "model.onnx"), graph)
  if engine_fn is not None:
    example = jax.ShapeDtypeStruct((1, *graph.input_shape), np.float32)
    sizes["model.stablehlo"] = save_stablehlo(
        os.path.join(folder, "model.stablehlo"), engine_fn, example, symbolic_batch=True)
  sizes["encodings.json"] = save_encodings(os.path.join(folder, "encodings.json"), graph)
  sizes["weights.bin"] = save_packed(os.path.join(folder, "weights.bin"), graph_weights(graph))
  return sizes
