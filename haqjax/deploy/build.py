"""Lowering a haqjax model and a policy to an integer `Graph`.

`build(model, variables, policy, example_input)` captures the model's float
dataflow (`haqjax.deploy.capture`) and lowers each op:

* A quantized layer (`a_bits`, `w_bits` < 32) becomes the node producing its
  input codes (`<layer>:in`, on the grid of its activation quantizer), then
  `conv` / `dense` on int8 weight codes (per output channel, from its weight
  quantizer; the BN-folded kernel when it folds) with an int32 bias, giving
  an int32 accumulator. A plain BatchNorm after it folds into the
  accumulator's per-channel scale and the bias: `y = acc * s_x * s_w[c] *
  g[c]` with `g = gamma / sqrt(var + eps)` and the bias
  `round((beta + (b - mean) * g) / (s_x * s_w[c] * g[c]))`.
* ReLU, ReLU6 and other clips stay pending on the value and become the clamp
  bounds of every requantization that reads it, computed in the target's
  codes as `quantize` computes them, so `round(clip(y))` is exact.
* Each consumer requantizes the int32 accumulator to what it needs: a
  quantized layer to its own input encoding (one `requantize`, the TFLite /
  gemmlowp fixed-point multiplier `s_acc[c] / s_in` and shift, rounded once
  by default, half up, TFLite's single rounding; `rounding='gemmlowp'`
  rounds twice as gemmlowp does);
  an `add`, `mean` or `max_pool` to a wide int32 tensor.
* Wide tensors (residual streams, pooled sums) have zero point 0 and a power
  of two scale `2^-k`, the finest with `bound * 2^k <= WIDE_CAPACITY / n`
  (`n` = H * W before a `mean`, else 1), where `bound` is a guaranteed bound
  of the real value: for an accumulator `max_c (sum |w[., c]| * max |x - zx|
  + |bias[c]|) * |s_acc[c]|`, sums of bounds for adds, the clip where one
  applies. So adds of two wide tensors and the `H * W`-term sums of a
  `mean` cannot overflow int32, and the wide step is far below any codes
  step (it is at least `2^29 / 2^k`-times finer than the bound). Residual
  adds are int32 adds after requantizing both operands to the add's scale;
  `max_pool` runs on the wide tensor; `mean` sums in int32 and folds
  `1 / (H * W)` into its output scale.
* A 32-bit layer (`a_bits` or `w_bits` equal to `FLOAT_BITS`) stays float:
  its input is dequantized (after its codes when `a_bits` < 32), it runs
  `float_conv` / `float_dense` on the fake-quantized (or float) kernel with
  its BatchNorm folded into a per-channel multiply-add, and every consumer
  quantizes its float output (`quantize`).
* The logits are the dequantized classifier accumulator (float32).

A zero scale (an all-zero channel or input range) makes every code the zero
point; the accumulator then uses the largest weight scale of the layer (or
1) in its place so that its bias stays exact, and a BatchNorm with gamma 0
zeroes the channel's weight codes so that it outputs its bias.

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference. CVPR 2018. https://arxiv.org/abs/1712.05877
  gemmlowp, doc/quantization.md. https://github.com/google/gemmlowp
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import numpy as np

from haqjax.deploy import capture as capture_lib
from haqjax.deploy import fixed_point
from haqjax.deploy import layers
from haqjax.deploy.layers import Value
from haqjax.deploy.graph import ROUNDINGS
from haqjax.deploy.graph import WIDE_CAPACITY
from haqjax.deploy.graph import Encoding
from haqjax.deploy.graph import Graph
from haqjax.deploy.graph import Node
from haqjax.policy import Policy
from haqjax.treeutil import get_path
from haqjax.typing import Array, PyTree

INPUT = "input"
OUTPUT = "logits"
# The float input's bound (for a wide tensor fed by a float layer) is this
# many times the largest of the example input and the calibrated ranges of
# the layers that read it; values beyond it saturate.
INPUT_MARGIN = 4.0


def _wide(scale: float) -> Encoding:
  return Encoding(bits=32, signed=True, scale=np.float32(scale), zero_point=0, dtype="int32")


def wide_scale(bound: float, capacity: float) -> float:
  """The finest power of two `s` with `bound / s <= capacity`."""
  if not bound > 0:
    return 1.0
  return 2.0 ** math.ceil(math.log2(bound / capacity))


class _Lowering:
  """Lowers captured ops to graph nodes (see the module docstring)."""

  def __init__(self, captured: capture_lib.Captured, variables: PyTree, policy: Policy,
               input_bound: float, rounding: str):
    self.rounding = rounding
    self.ops = captured.ops
    self.output = captured.output
    self.params = variables["params"]
    self.stats = variables.get("batch_stats", {})
    self.policy = policy
    self.input_bound = input_bound
    self.nodes: list[Node] = []
    self.names: set[str] = {INPUT}
    self.values: dict[int, Value] = {}
    self.consumers: dict[int, list[int]] = {i: [] for i in range(len(self.ops))}
    for i, op in enumerate(self.ops):
      for j in op.inputs:
        self.consumers[j].append(i)

  def emit(self, node: Node) -> str:
    self.nodes.append(node)
    self.names.add(node.name)
    return node.name

  def unique(self, name: str) -> str:
    if name not in self.names:
      return name
    i = 2
    while f"{name}:{i}" in self.names:
      i += 1
    return f"{name}:{i}"

  def run(self) -> tuple[Node, ...]:
    for i, op in enumerate(self.ops):
      if i in self.values:
        continue  # A BatchNorm folded into its layer.
      self.values[i] = getattr(self, f"_{op.kind}")(i, op)
    self.to_float(self.values[self.output], OUTPUT)
    return tuple(self.nodes)

  # -- conversions -------------------------------------------------------

  def _clip_bounds(self, v: Value, inv: np.float32, zp: int, qmin: int, qmax: int
                   ) -> tuple[np.int32, np.int32]:
    lo, hi = qmin, qmax
    if np.isfinite(v.lo):
      lo = max(lo, zp + int(np.round(np.float32(v.lo) * inv)))
    if np.isfinite(v.hi):
      hi = min(hi, zp + int(np.round(np.float32(v.hi) * inv)))
    return np.int32(max(min(lo, qmax), qmin)), np.int32(max(min(hi, qmax), qmin))

  def to_integer(self, v: Value, enc: Encoding, inv: np.float32, name: str,
                 capacity: int = WIDE_CAPACITY) -> str:
    """A node holding `v` (clipped) in `enc`; a wide one clamped to +-`capacity`."""
    qmin, qmax = (-capacity, capacity) if enc.is_wide else enc.qrange
    lo, hi = self._clip_bounds(v, inv, enc.zero_point, qmin, qmax)
    arrays = {"lo": lo, "hi": hi}
    if v.kind == "float":
      return self.emit(Node(name=name, op="quantize", inputs=(v.node,),
                            arrays={"inv_scale": inv, **arrays}, encoding=enc))
    out_scale = float(enc.scale)
    real = (np.zeros_like(v.scale, np.float64) if out_scale == 0
            else v.scale.astype(np.float64) / out_scale)
    m, shift = fixed_point.quantize_multiplier(real)
    return self.emit(Node(name=name, op="requantize", inputs=(v.node,),
                          attrs={"rounding": self.rounding},
                          arrays={"multiplier": m, "shift": shift,
                                  "real_multiplier": real.astype(np.float32), **arrays},
                          encoding=enc))

  def to_wide(self, v: Value, name: str, capacity: int = WIDE_CAPACITY) -> Value:
    """`v` as a wide int32 tensor (its clip applied)."""
    scale = wide_scale(v.bound, capacity)
    if (v.kind == "wide" and float(v.scale) == scale and not np.isfinite(v.lo)
        and not np.isfinite(v.hi)):
      return v
    node = self.to_integer(v, _wide(scale), np.float32(1.0 / scale), name, capacity)
    return Value("wide", node, np.float64(scale), v.bound)

  def to_float(self, v: Value, name: str) -> str:
    """A float32 node holding `v` (clipped)."""
    clipped = np.isfinite(v.lo) or np.isfinite(v.hi)
    if v.kind == "float" and not clipped:
      return v.node
    if clipped:
      v = self.to_wide(v, self.unique(f"{name}:wide"))
    return self.emit(Node(name=self.unique(name), op="dequantize", inputs=(v.node,)))

  # -- ops ---------------------------------------------------------------

  def _input(self, i: int, op: capture_lib.Op) -> Value:
    del i, op
    return Value("float", INPUT, None, self.input_bound)

  def _batch_norm(self, i: int, op: capture_lib.Op) -> Value:
    raise ValueError(f"deploy: BatchNorm {op.where!r} does not directly follow a layer "
                     "whose only consumer it is; allowed: QConv/QDense -> BatchNorm")

  def _clip(self, i: int, op: capture_lib.Op) -> Value:
    v = self.values[op.inputs[0]]
    lo, hi = max(v.lo, op.attrs["lo"]), min(v.hi, op.attrs["hi"])
    bound = v.bound
    if np.isfinite(lo) and np.isfinite(hi):
      bound = min(bound, max(abs(lo), abs(hi)))
    return dataclasses.replace(v, lo=lo, hi=hi, bound=bound)

  def _add(self, i: int, op: capture_lib.Op) -> Value:
    a, b = (self.values[j] for j in op.inputs)
    name = self.unique(f"{op.where}:add")
    scale = wide_scale(a.bound + b.bound, WIDE_CAPACITY)
    enc = _wide(scale)
    ins = []
    for k, v in enumerate((a, b)):
      if v.kind == "wide" and float(v.scale) == scale and not (
          np.isfinite(v.lo) or np.isfinite(v.hi)):
        ins.append(v.node)
      else:
        ins.append(self.to_integer(v, enc, np.float32(1.0 / scale), f"{name}:in{k}"))
    arrays = {"lo": np.int32(-WIDE_CAPACITY), "hi": np.int32(WIDE_CAPACITY)}
    self.emit(Node(name=name, op="add", inputs=tuple(ins), arrays=arrays, encoding=enc))
    return Value("wide", name, np.float64(scale), a.bound + b.bound)

  def _mean(self, i: int, op: capture_lib.Op) -> Value:
    _, h, w, _ = self.ops[op.inputs[0]].shape
    name = self.unique(f"{op.where}:mean")
    v = self.to_wide(self.values[op.inputs[0]], f"{name}:in", WIDE_CAPACITY // (h * w))
    scale = float(v.scale) / (h * w)
    self.emit(Node(name=name, op="mean", inputs=(v.node,), encoding=_wide(scale)))
    return Value("wide", name, np.float64(scale), v.bound)

  def _max_pool(self, i: int, op: capture_lib.Op) -> Value:
    name = self.unique(f"{op.where}:max_pool")
    v = self.to_wide(self.values[op.inputs[0]], f"{name}:in")
    self.emit(Node(name=name, op="max_pool", inputs=(v.node,), attrs=op.attrs,
                   encoding=_wide(float(v.scale))))
    return dataclasses.replace(v, node=name)

  def _reshape(self, i: int, op: capture_lib.Op) -> Value:
    v = self.values[op.inputs[0]]
    name = self.unique(f"{op.where}:reshape")
    if v.kind == "acc":
      v = self.to_wide(v, f"{name}:in")
    enc = None if v.kind == "float" else self.nodes_by_name(v.node).encoding
    self.emit(Node(name=name, op="reshape", inputs=(v.node,), attrs={"shape": op.attrs["shape"]},
                   encoding=enc))
    return dataclasses.replace(v, node=name)

  def nodes_by_name(self, name: str) -> Node:
    return next(n for n in self.nodes if n.name == name)

  def _layer(self, i: int, op: capture_lib.Op) -> Value:
    info: capture_lib.LayerInfo = op.attrs["info"]
    bn_op = None
    users = self.consumers[i]
    if len(users) == 1 and self.ops[users[0]].kind == "batch_norm":
      bn_op = users[0]
    value = layers.lower_layer(self, info, self.values[op.inputs[0]],
                               None if bn_op is None else self.ops[bn_op].attrs)
    if bn_op is not None:
      self.values[bn_op] = value
    return value


def _input_bound(captured: capture_lib.Captured, variables: PyTree, example: Array) -> float:
  bound = float(np.max(np.abs(np.asarray(example)))) if np.size(example) else 0.0
  for op in captured.ops:
    if op.kind == "layer" and op.inputs == (0,):
      layer = get_path(variables["params"], op.attrs["info"].path)
      for key in ("lo", "hi", "clip"):
        if key in layer.get("act_quant", {}):
          bound = max(bound, float(np.max(np.abs(np.asarray(layer["act_quant"][key])))))
  return INPUT_MARGIN * max(bound, 1.0)


def build(model: nn.Module, variables: PyTree, policy: Policy, example_input: Array,
          *, input_bound: float | None = None, rounding: str = "single") -> Graph:
  """The integer graph of `model` with `variables` at `policy`.

  Args:
    model: a model of haqjax layers, or a `haqjax.nn.quantized` plain flax
      model whose `nn.Conv` / `nn.Dense` ops lower as `QConv` / `QDense`
      (activation and weight quantizers of `haqjax.deploy.quantizers`:
      calibrated `StaticRange`, LSQ, PACT or HAQ's activations; `MinMaxWeight`,
      `StaticRange` or LSQ weights).
    variables: its variables, calibrated.
    policy: the bits of every layer (`FLOAT_BITS` for a float layer).
    example_input: an input batch, NHWC (its shape and, for the float
      input's bound, its values).
    input_bound: bound of `|input|` used only where a float layer feeds a wide
      tensor; default `INPUT_MARGIN` times the larger of the example's and the
      first layers' calibrated range.
    rounding: of every `requantize`: 'single' (TFLite's single rounding,
      the exact `acc * multiplier` rounded once, as the fake-quantized model
      rounds `y / s` once) or 'gemmlowp' (gemmlowp's two roundings, which
      can land one code off where the first lands on a half of the second:
      rare, but a constant channel repeats it at every position).

  Returns:
    The `Graph` (nodes, input `"input"`, output `"logits"`, the policy).

  Raises:
    ValueError: an operation, quantizer or pattern the integer graph cannot
      express, naming the layer or module.
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding is {rounding!r}; allowed: {', '.join(ROUNDINGS)}")
  captured = capture_lib.capture(model, variables, example_input)
  if input_bound is None:
    input_bound = _input_bound(captured, variables, example_input)
  lowering = _Lowering(captured, variables, policy, float(input_bound), rounding)
  nodes = lowering.run()
  return Graph(nodes=nodes, input=INPUT, output=nodes[-1].name, policy=policy,
               input_shape=tuple(np.shape(example_input)[1:]))
