"""The GEMM view of a network, as shape arrays that hardware models read.

Every accelerator model in `haqjax.hardware` sees a layer as one or more
independent matrix products (GEMMs): a convolution with `G` groups is `G`
GEMMs of `[M, K] x [K, N]` with

  * `M = batch * out_h * out_w` (output pixels, the rows of the im2col matrix),
  * `N = out_channels / G` (filters per group),
  * `K = kernel_h * kernel_w * in_channels / G` (reduction length).

A depthwise convolution is therefore `C` GEMMs of `[M, R*S] x [R*S, 1]`, and a
dense layer is `[batch * tokens, in] x [in, out]`. `Layers` keeps these numbers
as float32 arrays (one entry per layer) so that they are pytree leaves: a cost
function compiled for one network serves any other network with the same
number of layers, and bits stay traced data.

The cost models depend on these arrays only; `haqjax.hardware.model_layers`
builds them from a `haqjax.nn.LayerTable` or a model, `topology` from a
SCALE-Sim file. Example::

    layers = make_layers(names=["conv"], in_channels=[3], out_channels=[8],
                         kernel_h=[3], kernel_w=[3], groups=[1], in_h=[32],
                         in_w=[32], out_h=[30], out_w=[30], batch=16)
    layers.m  # [L] output pixels times batch
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

from haqjax.typing import Array


@flax.struct.dataclass
class Layers:
  """Per-layer GEMM shapes and tensor sizes, float32 arrays `[L]`.

  Attributes:
    m: GEMM rows, `batch * out_h * out_w`.
    n: GEMM columns per group, `out_channels / groups`.
    k: reduction length per group, `kernel_h * kernel_w * in_channels / groups`.
    groups: independent GEMMs per layer (channels of a depthwise conv).
    kernel_size: `kernel_h * kernel_w`.
    in_elems: input activation elements of the batch, `batch * in_h * in_w * in_channels`.
    out_elems: output elements of the batch, `batch * out_h * out_w * out_channels`.
    weights: quantized weights (kernel elements, no bias).
    biases: bias elements (kept in 32 bits).
    macs: multiply-accumulates of the batch.
    depthwise: 1.0 for a depthwise conv, else 0.0.
    first: 1.0 for the network's first layer (Bit Fusion maps it with im2col).
    batch: batch size (the same in every entry).
    names: layer names (static).
    kernel_h, in_h, in_w, out_h, out_w: per-example shapes (a conv's input
      and output sides, its kernel's height; `kernel_size / kernel_h` is its
      width). With a known stride the input sides are the padded input the
      conv reads (SCALE-Sim's IFMAP; `in_elems` may count the unpadded one).
    stride: the conv's stride along both sides; 0.0 where unknown (then the
      im2col addresses of the input are not modelled).
  """
  m: Array
  n: Array
  k: Array
  groups: Array
  kernel_size: Array
  in_elems: Array
  out_elems: Array
  weights: Array
  biases: Array
  macs: Array
  depthwise: Array
  first: Array
  batch: Array
  names: tuple[str, ...] = flax.struct.field(pytree_node=False)
  kernel_h: Array | None = None
  in_h: Array | None = None
  in_w: Array | None = None
  out_h: Array | None = None
  out_w: Array | None = None
  stride: Array | None = None

  def __len__(self) -> int:
    return len(self.names)

  @property
  def in_channels(self) -> Array:
    return self.k * self.groups / self.kernel_size

  @property
  def out_channels(self) -> Array:
    return self.n * self.groups

  @property
  def rhs_elems(self) -> Array:
    """Elements of the GEMMs' second operand, `groups * k * n`, per batch.

    A layer's kernel (`weights`), or, for a matmul of two activations, its
    second activation operand over the batch, which has to come from memory
    like a kernel although the model stores nothing.
    """
    return self.groups * self.k * self.n

  @property
  def conv_geometry(self) -> dict[str, Array] | None:
    """One group's conv as SCALE-Sim addresses its input, or None.

    `kernel_h`, `kernel_w`, `channels` (input channels per group),
    `stride`, `in_h`, `in_w`, `out_h`, `out_w`; None when `Layers` was built
    without them. A stride of 0.0 marks a layer whose stride is unknown.
    """
    if self.stride is None:
      return None
    return dict(kernel_h=self.kernel_h, kernel_w=self.kernel_size / self.kernel_h,
                channels=self.k / self.kernel_size, stride=self.stride,
                in_h=self.in_h, in_w=self.in_w, out_h=self.out_h, out_w=self.out_w)


def _positive(field: str, values: np.ndarray, names: Sequence[str]) -> None:
  bad = ~(values > 0)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{field} of layer {i} ({names[i]!r}) is {values[i]}; "
                     "allowed: a positive integer")


def make_layers(*, names: Sequence[str], in_channels, out_channels, kernel_h,
                kernel_w, groups, in_h, in_w, out_h, out_w, batch: int,
                depthwise=None, biases=None, stride=None) -> Layers:
  """Builds `Layers` from per-layer integer shapes (sequences or arrays `[L]`).

  Args:
    names: layer names.
    in_channels, out_channels, kernel_h, kernel_w, groups, in_h, in_w, out_h,
      out_w: per-layer shapes of one example.
    batch: batch size.
    depthwise: per-layer booleans; default `groups == in_channels > 1`.
    biases: bias elements per layer; default 0.
    stride: per-layer conv strides (padded inputs, SCALE-Sim's convention:
      `out_h = ceil((in_h - kernel_h + stride) / stride)`); default unknown.

  Returns:
    The `Layers`.

  Raises:
    ValueError: for a non-positive size or channels not divisible by groups.
  """
  names = tuple(names)
  cols = dict(in_channels=in_channels, out_channels=out_channels,
              kernel_h=kernel_h, kernel_w=kernel_w, groups=groups, in_h=in_h,
              in_w=in_w, out_h=out_h, out_w=out_w)
  v = {c: np.asarray(x, np.int64).reshape(-1) for c, x in cols.items()}
  for c, x in v.items():
    if x.shape != (len(names),):
      raise ValueError(f"{c} has {x.size} entries; expected {len(names)} (one per layer)")
    _positive(c, x, names)
  if batch < 1:
    raise ValueError(f"batch is {batch}; allowed: a positive integer")
  for c in ("in_channels", "out_channels"):
    bad = v[c] % v["groups"] != 0
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(f"{c} of layer {i} ({names[i]!r}) is {v[c][i]}; allowed: "
                       f"a multiple of groups ({v['groups'][i]})")
  g = v["groups"]
  rs = v["kernel_h"] * v["kernel_w"]
  m = batch * v["out_h"] * v["out_w"]
  n = v["out_channels"] // g
  k = rs * v["in_channels"] // g
  if depthwise is None:
    depthwise = (g == v["in_channels"]) & (g > 1)
  biases = np.zeros(len(names)) if biases is None else np.asarray(biases)
  first = np.zeros(len(names))
  first[:1] = 1.0
  stride = np.zeros(len(names)) if stride is None else np.asarray(stride).reshape(-1)
  if stride.shape != (len(names),):
    raise ValueError(f"stride has {stride.size} entries; expected {len(names)} (one per layer)")
  f32 = lambda x: jnp.asarray(np.asarray(x, np.float64), jnp.float32)
  return Layers(
      m=f32(m), n=f32(n), k=f32(k), groups=f32(g), kernel_size=f32(rs),
      in_elems=f32(batch * v["in_h"] * v["in_w"] * v["in_channels"]),
      out_elems=f32(m * v["out_channels"]), weights=f32(g * n * k),
      biases=f32(biases), macs=f32(g * m * n * k),
      depthwise=f32(np.asarray(depthwise, np.float64)), first=f32(first),
      batch=f32(np.full(len(names), batch)), names=names,
      kernel_h=f32(v["kernel_h"]), in_h=f32(v["in_h"]), in_w=f32(v["in_w"]),
      out_h=f32(v["out_h"]), out_w=f32(v["out_w"]), stride=f32(stride))


def effective_bits(bits: Array, max_bits: int = 8) -> Array:
  """Bits an integer datapath uses: floating point (32) runs at `max_bits`.

  HAQ leaves the network input in floating point; accelerators built for at
  most 8-bit operands run such a tensor at their widest mode. Bits are also
  floored at 1.
  """
  bits = jnp.asarray(bits, jnp.float32)
  return jnp.clip(bits, 1.0, float(max_bits))


def ceil_div(a: Array, b: Array) -> Array:
  """`ceil(a / b)` on float arrays holding whole numbers."""
  return jnp.ceil(jnp.asarray(a, jnp.float32) / b)
