"""The integer graph: a model-independent description of a deployed network.

`haqjax.deploy.build` lowers a haqjax model and a policy to a `Graph`;
`haqjax.deploy.engine` runs it with integer arithmetic; an exporter
translates it node by node. Everything is plain data: frozen dataclasses
holding numpy arrays and Python scalars.

Tensors. Every node produces one tensor, named as the node, NHWC (or `[N, C]`
after pooling), with a leading batch axis. Its `Encoding` says what the
integers mean: `real = (q - zero_point) * scale`, `scale` per tensor (shape
`()`) or per channel along `axis` (shape `[C]`, always the last axis here).
Three kinds of tensor occur:

* codes: `bits` <= 8, stored as `int8` (signed grid) or `uint8` (unsigned
  grid), on the grid `[qmin, qmax]` of `haqjax.quant.affine.qrange` (the
  quantizer's convention, whatever it is); scale >= 0.
* int32: accumulators (`conv`, `dense`: per-channel scale, zero point 0; the
  scale of a channel is negative when a BatchNorm with negative gamma
  follows the layer) and wide tensors (residual streams, pooled sums:
  per-tensor scale, zero point 0, `|q| <= WIDE_CAPACITY`).
* float32: `encoding is None`: the graph input, the output logits and the
  inside of 32-bit (floating-point) layers.

Ops (`OPS`), their arrays and attributes, and their exact semantics. `x` is
the (first) input tensor, `zx` its zero point, `round_half_even` is
`jnp.round`, integer arithmetic is exact (no intermediate overflow) unless
said otherwise:

* `quantize` (float -> codes or int32). Arrays: `inv_scale` float32 `()`
  (`1 / scale` computed in float32, 0 where the scale is 0), `lo`, `hi`
  int32 `()` (clamp bounds within the grid, tighter for a fused
  ReLU/ReLU6). `q = clip(round_half_even(x * inv_scale) + zero_point, lo,
  hi)` with the product in float32: bit for bit `haqjax.quant.affine.quantize`.
* `dequantize` (codes or int32 -> float). No arrays. `(x - zx) * scale_x`
  in float32, the scale broadcast along the channel axis.
* `conv` (codes -> int32 accumulator). Arrays: `weight` int8 `[kh, kw,
  cin / groups, cout]` (symmetric codes, zero point 0), `weight_scale`
  float32 `[cout]`, `bias` int32 `[cout]` (in accumulator units),
  `acc_shift` int32 `()` (fraction bits of the accumulator; absent: 0),
  `bn_mul` float32 `[cout]` (informational). Attributes: `strides` (sh, sw),
  `padding` ((top, bottom), (left, right)), `groups`.
  `acc[n, h, w, c] = ((sum over the window of (x - zx) * weight) <<
  acc_shift) + bias[c]`, where padded positions of `x` hold `zx` (real
  zero); the builder bounds it below 2^30. Output scale per channel:
  `scale_x * weight_scale[c] * bn_mul[c] / 2^acc_shift` (`bn_mul` is the
  folded plain BatchNorm's `gamma / sqrt(var + eps)`, else 1). The fraction
  bits keep the bias exact to a small part of an output step at low bits.
* `dense` (codes `[N, K]` -> int32 `[N, C]`). Arrays as `conv` with `weight`
  `[K, C]`. `acc[n, c] = ((sum_k (x[n, k] - zx) * weight[k, c]) <<
  acc_shift) + bias[c]`.
* `requantize` (int32 or codes -> codes or int32). Arrays: `multiplier`
  int32, `shift` int32 (both `()` or `[C]`), `lo`, `hi` int32 `()`, and
  `real_multiplier` float32 (`scale_x / scale_out`, for reference only).
  Attribute `rounding`: 'single' (what `build` writes by default) or
  'gemmlowp' (also the meaning when absent). 'gemmlowp' is
  gemmlowp / TFLite `MultiplyByQuantizedMultiplier` with a signed
  multiplier `|m|` in `[2^30, 2^31)` (or 0) and exponent `shift`
  (`real_multiplier ~= m * 2^(shift - 31)`)::

      v = x - zx
      v = saturate_int32(v * 2^max(shift, 0))              # left shift
      v = SaturatingRoundingDoublingHighMul(v, m)          # (v*m + nudge) / 2^31
      v = RoundingDivideByPOT(v, max(-shift, 0))           # right shift
      q = clip(v + zero_point_out, lo, hi)

  where `SaturatingRoundingDoublingHighMul(a, b)` is `(a*b + (2^30 if a*b
  >= 0 else 1 - 2^30)) / 2^31` truncated toward zero on the exact 64-bit
  product (round half up), and `RoundingDivideByPOT(v, e)` is `v >> e`
  plus one when the remainder `v & (2^e - 1)` exceeds `(2^e - 1) >> 1` (plus
  one more for negative `v`): round half away from zero. ReLU is `lo =
  zero_point_out`; ReLU6 is `hi = zero_point_out + round_half_even(6 *
  inv_scale_out)` (computed as `quantize` would). 'single' is TFLite's
  single-rounding variant: `v = (v * m + 2^(n - 1)) >> n` with `n = 31 -
  shift` on the exact 64-bit product (round half up), saturated to int32,
  then the same zero point and clamp.
* `add` (int32, int32 -> int32, all three with the same encoding). Arrays:
  `lo`, `hi` int32 `()`. `q = clip(a + b, lo, hi)` (the builder bounds
  the operands so the sum never overflows).
* `clamp` (any integer tensor -> same encoding). Arrays `lo`, `hi` int32 `()`.
  `q = clip(x, lo, hi)`.
* `max_pool` (codes or int32 -> same encoding). Attributes: `window`
  (wh, ww), `strides` (sh, sw), `padding` ((top, bottom), (left, right)).
  The maximum of the window; padded positions never win.
* `mean` (codes or int32 `[N, H, W, C]` -> int32 `[N, C]`). No arrays.
  `q[n, c] = sum_{h, w} (x - zx)`, exact; the output scale is `scale_x /
  (H * W)`, so the division is folded into the next requantization.
* `reshape` (any -> same encoding, float included). Attribute `shape`
  (without the batch axis).
* `float_conv`, `float_dense` (float -> float): a 32-bit layer. Arrays:
  `kernel` float32 (the fake-quantized kernel when the weights are
  quantized), `mul`, `bias` float32 `[C]`, `lo`, `hi` float32 `()`.
  Attributes as `conv`. `y = clip(conv(x, kernel) * mul + bias, lo, hi)` in
  float32: the layer, its BatchNorm (folded into `mul`, `bias`) and its
  ReLU/ReLU6 (`lo`, `hi`).

Naming: a layer's integer node (`conv`, `dense`, `float_conv`,
`float_dense`) carries the haqjax layer name (e.g. `layer1_0/conv1`), the
node producing its input codes is `<layer>:in`; other nodes are
`<producer>:<what>` (e.g. `layer1_0/conv2:wide`, `layer1_0:add`). The graph
input is the float tensor `Graph.input` (not a node).

Changes are additive: new ops, arrays and attributes may appear; the
semantics above do not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from haqjax.policy import Policy
from haqjax.quant import affine

# Every op a node may have; see the module docstring for their semantics.
OPS = ("quantize", "dequantize", "conv", "dense", "requantize", "add", "clamp",
       "max_pool", "mean", "reshape", "float_conv", "float_dense")
# The `rounding` attribute of `requantize` (absent: 'gemmlowp').
ROUNDINGS = ("single", "gemmlowp")
# Storage dtypes of integer tensors.
DTYPES = ("int8", "uint8", "int32")
# Largest magnitude of a wide int32 tensor (residual streams, pooled sums):
# two of them add without overflow, and a left shift by one before a
# multiplier of at least 1/2 stays in int32.
WIDE_CAPACITY = 2**29
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

# The arrays and attributes each op must have.
_REQUIRED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "quantize": (("inv_scale", "lo", "hi"), ()),
    "dequantize": ((), ()),
    "conv": (("weight", "weight_scale", "bias"), ("strides", "padding", "groups")),
    "dense": (("weight", "weight_scale", "bias"), ()),
    "requantize": (("multiplier", "shift", "lo", "hi"), ()),
    "add": (("lo", "hi"), ()),
    "clamp": (("lo", "hi"), ()),
    "max_pool": ((), ("window", "strides", "padding")),
    "mean": ((), ()),
    "reshape": ((), ("shape",)),
    "float_conv": (("kernel", "mul", "bias", "lo", "hi"), ("strides", "padding", "groups")),
    "float_dense": (("kernel", "mul", "bias", "lo", "hi"), ()),
}
# How many inputs each op takes.
_ARITY = {"add": 2}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Encoding:
  """What the integers of a tensor mean: `real = (q - zero_point) * scale`.

  Attributes:
    bits: grid bits (1..8 for codes), 32 for int32 tensors.
    signed: signed grid (codes stored as int8) or unsigned (uint8).
    scale: float32, `()` per tensor or `[C]` per channel along `axis`.
    zero_point: the integer that means 0.
    dtype: storage dtype, one of `DTYPES`.
    symmetric: zero point fixed at 0 by the quantizer's spec.
    axis: the channel axis of a per-channel scale (None per tensor).
    narrow_range: the grid drops its lowest code (see `AffineSpec`).
  """
  bits: int
  signed: bool
  scale: np.ndarray
  zero_point: int
  dtype: str
  symmetric: bool = True
  axis: int | None = None
  narrow_range: bool = False

  def __post_init__(self):
    object.__setattr__(self, "scale", np.asarray(self.scale, np.float32))
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype is {self.dtype!r}; allowed: {', '.join(DTYPES)}")
    if self.dtype == "int32":
      if self.bits != 32:
        raise ValueError(f"bits is {self.bits!r} for dtype int32; allowed: 32")
    else:
      if not 1 <= self.bits <= 8:
        raise ValueError(f"bits is {self.bits!r} for dtype {self.dtype}; allowed: 1..8")
      want = "int8" if self.signed else "uint8"
      if self.dtype != want:
        kind = "a signed" if self.signed else "an unsigned"
        raise ValueError(f"dtype is {self.dtype!r} for {kind} grid; allowed: {want}")
      if np.any(self.scale < 0):
        raise ValueError("scale has negative entries; allowed: scale >= 0 for codes")
    if self.scale.ndim not in (0, 1):
      raise ValueError(f"scale has shape {self.scale.shape}; allowed: () or [C]")
    if (self.scale.ndim == 1) != (self.axis is not None):
      raise ValueError(f"axis is {self.axis!r} for a scale of shape {self.scale.shape}; "
                       "allowed: an axis exactly when the scale is per channel")
    if not np.all(np.isfinite(self.scale)):
      raise ValueError("scale has non-finite entries; allowed: finite scales")
    qmin, qmax = self.qrange
    if not qmin <= self.zero_point <= qmax:
      raise ValueError(f"zero_point is {self.zero_point!r}; allowed: {qmin}..{qmax}")

  @property
  def qrange(self) -> tuple[int, int]:
    """`(qmin, qmax)`: the grid (int32 limits for int32 tensors)."""
    if self.dtype == "int32":
      return INT32_MIN, INT32_MAX
    qmin, qmax = affine.qrange(self.bits, signed=self.signed,
                               narrow_range=self.narrow_range)
    return int(qmin), int(qmax)

  @property
  def is_wide(self) -> bool:
    return self.dtype == "int32"


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Node:
  """One op of the graph.

  Attributes:
    name: the node's (and its output tensor's) unique name.
    op: one of `OPS`.
    inputs: names of the input tensors (nodes or the graph input).
    attrs: static attributes (ints, tuples).
    arrays: numpy arrays (codes, scales, multipliers, clamp bounds).
    encoding: the output's encoding; None for a float32 output.
  """
  name: str
  op: str
  inputs: tuple[str, ...]
  attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  arrays: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  encoding: Encoding | None = None

  def __post_init__(self):
    if self.op not in OPS:
      raise ValueError(f"node {self.name!r}: op is {self.op!r}; allowed: {', '.join(OPS)}")
    object.__setattr__(self, "inputs", tuple(self.inputs))
    arity = _ARITY.get(self.op, 1)
    if len(self.inputs) != arity:
      raise ValueError(f"node {self.name!r}: op {self.op} has {len(self.inputs)} inputs; "
                       f"allowed: {arity}")
    arrays, attrs = _REQUIRED[self.op]
    missing = [a for a in arrays if a not in self.arrays] + [
        a for a in attrs if a not in self.attrs]
    if missing:
      raise ValueError(f"node {self.name!r}: op {self.op} lacks {', '.join(missing)}")
    object.__setattr__(self, "arrays", {k: np.asarray(v) for k, v in self.arrays.items()})
    object.__setattr__(self, "attrs", dict(self.attrs))
    floats = self.op in ("dequantize", "float_conv", "float_dense")
    if self.op != "reshape" and floats != (self.encoding is None):
      raise ValueError(f"node {self.name!r}: op {self.op} "
                       f"{'has a float' if floats else 'needs an integer'} output; "
                       f"encoding is {'set' if self.encoding else 'None'}")

  def static_key(self) -> tuple[Any, ...]:
    """What a compiled engine depends on: op, wiring, attributes, dtypes, shapes."""
    arrays = tuple((k, v.dtype.str, v.shape) for k, v in sorted(self.arrays.items()))
    enc = None if self.encoding is None else (self.encoding.dtype, self.encoding.scale.shape)
    attrs = tuple(sorted((k, _frozen(v)) for k, v in self.attrs.items()))
    return (self.name, self.op, self.inputs, attrs, arrays, enc)


def _frozen(v: Any) -> Any:
  if isinstance(v, (list, tuple)):
    return tuple(_frozen(x) for x in v)
  return v


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Graph:
  """An integer network: nodes in topological order.

  Attributes:
    nodes: the nodes, each after the nodes it reads.
    input: the name of the float32 input tensor, NHWC.
    output: the name of the output tensor (float32 logits).
    policy: the policy the graph was built with.
    input_shape: the input's shape without the batch axis.
  """
  nodes: tuple[Node, ...]
  input: str
  output: str
  policy: Policy | None = None
  input_shape: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "nodes", tuple(self.nodes))
    known = {self.input}
    for node in self.nodes:
      if node.name in known:
        raise ValueError(f"node name {node.name!r} is used twice; allowed: unique names")
      for name in node.inputs:
        if name not in known:
          raise ValueError(f"node {node.name!r} reads {name!r}, which no earlier node "
                           "produces; allowed: nodes in topological order")
      known.add(node.name)
    if self.output not in known:
      raise ValueError(f"output is {self.output!r}; allowed: a node of the graph")

  def node(self, name: str) -> Node:
    """The node called `name`."""
    for node in self.nodes:
      if node.name == name:
        return node
    raise ValueError(f"node {name!r} is not in the graph")

  def encoding(self, name: str) -> Encoding | None:
    """The encoding of tensor `name` (None: float32, as the graph input)."""
    return None if name == self.input else self.node(name).encoding

  def layers(self) -> tuple[str, ...]:
    """The haqjax layer names, in graph order."""
    return tuple(n.name for n in self.nodes
                 if n.op in ("conv", "dense", "float_conv", "float_dense"))

  def static_key(self) -> tuple[Any, ...]:
    """The structure (hashable): equal for graphs one compiled engine runs."""
    return (self.input, self.output, tuple(self.input_shape),
            tuple(n.static_key() for n in self.nodes))
