"""Lowering one quantizable layer (with its BatchNorm) to graph nodes.

See `haqjax.deploy.build` for the conventions; this module holds the
per-layer arithmetic: BN folding into the accumulator scale and bias, the
int32 bias, the accumulator bound that sizes wide tensors, and the float
form of 32-bit layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from haqjax.deploy import quantizers
from haqjax.deploy.capture import LayerInfo
from haqjax.deploy.graph import Encoding
from haqjax.deploy.graph import Node
from haqjax.nn.bn_folding import folded_kernel_and_bias
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy
from haqjax.treeutil import get_path
from haqjax.typing import PyTree


# Largest magnitude of a layer's int32 accumulator (bias included).
ACC_CAPACITY = 2**30
# Most fraction bits an accumulator carries (see `_acc_shift`).
MAX_ACC_SHIFT = 16


@dataclasses.dataclass(frozen=True)
class Value:
  """How the lowering holds a captured value, with a clip still to apply.

  Attributes:
    kind: 'acc' (int32 accumulator, per-channel `scale`), 'wide' (int32,
      per-tensor `scale`) or 'float'.
    node: the node that holds it.
    scale: real value of one integer step (float64), None for float.
    bound: a bound of `|real|` (after the clip).
    lo, hi: the clip (ReLU, ReLU6) every reader applies.
  """
  kind: str
  node: str
  scale: np.ndarray | None
  bound: float
  lo: float = -np.inf
  hi: float = np.inf


def layer_bits(policy: Policy, name: str) -> tuple[int, int]:
  """`(w_bits, a_bits)` of layer `name` as Python ints."""
  w, a = policy.bits_for(name)
  return int(w), int(a)


def is_float(w_bits: int, a_bits: int) -> bool:
  """Whether a layer with these bits stays floating point."""
  return w_bits >= FLOAT_BITS or a_bits >= FLOAT_BITS


def quantized_kernel(info: LayerInfo, params: PyTree, stats: PyTree
                     ) -> tuple[np.ndarray, np.ndarray | None]:
  """The kernel the weight quantizer sees and the layer's bias (BN-folded if it folds)."""
  layer = get_path(params, info.path)
  kernel = jnp.asarray(layer["kernel"], jnp.float32)
  bias = layer.get("bias") if info.use_bias else None
  if info.bn is None:
    return np.asarray(kernel), None if bias is None else np.asarray(bias, np.float32)
  path, eps = info.bn
  w, b = _fold(kernel, get_path(params, path), get_path(stats, path), eps, bias)
  return np.asarray(w), np.asarray(b)


# Folding compiled once per shape (op by op, each op would compile per shape).
_fold = jax.jit(folded_kernel_and_bias, static_argnums=3)


def bn_affine(bn: dict[str, Any] | None, params: PyTree, stats: PyTree,
              bias: np.ndarray | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """`(mul, add)` float64 `[C]`: the layer's output is `conv * mul + add`."""
  b = np.zeros(channels) if bias is None else np.asarray(bias, np.float64)
  if bn is None:
    return np.ones(channels), b
  p = get_path(params, bn["path"])
  s = get_path(stats, bn["path"])
  gamma = np.asarray(p["scale"], np.float64) if bn["use_scale"] else np.ones(channels)
  beta = np.asarray(p["bias"], np.float64) if bn["use_bias"] else np.zeros(channels)
  mul = gamma / np.sqrt(np.asarray(s["var"], np.float64) + bn["epsilon"])
  return mul, beta + (b - np.asarray(s["mean"], np.float64)) * mul


def _acc_shift(products: np.ndarray, bias: np.ndarray) -> int | None:
  """Fraction bits of the accumulator: the most (up to `MAX_ACC_SHIFT`) that fit.

  The bias, rounded to accumulator steps, would otherwise be off by up to
  half a product unit `s_x * s_w[c]`, a sizeable part of an output step at 4
  bits; `2^shift` finer steps make that error negligible. The accumulator
  `products * 2^shift + bias` stays within `ACC_CAPACITY`. None: it does not
  fit even without fraction bits.
  """
  need = float(np.max(products + bias))
  if need > ACC_CAPACITY:
    return None
  if need == 0:
    return MAX_ACC_SHIFT
  return int(min(MAX_ACC_SHIFT, np.floor(np.log2(ACC_CAPACITY / need))))


def _geometry(info: LayerInfo) -> dict[str, Any]:
  if info.kind == "dense":
    return {}
  return {"strides": info.strides, "padding": info.padding, "groups": info.groups}


def lower_layer(lowering: Any, info: LayerInfo, x: Value, bn: dict[str, Any] | None
                ) -> Value:
  """Emits the nodes of layer `info` reading `x`; returns its (post-BN) output.

  Args:
    lowering: the `haqjax.deploy.build` lowering (its `emit`, `to_integer`,
      `to_float`, `params`, `stats`, `policy`).
    info: the captured layer.
    x: its input.
    bn: the plain BatchNorm folded into it (its captured attributes), or None.
  """
  name = info.name
  w_bits, a_bits = layer_bits(lowering.policy, name)
  layer = get_path(lowering.params, info.path)
  weight_q, act_q = info.quantizers
  kernel, bias = quantized_kernel(info, lowering.params, lowering.stats)
  channels = kernel.shape[-1]
  mul, add = bn_affine(bn, lowering.params, lowering.stats, bias, channels)
  enc = inv = None
  if a_bits < FLOAT_BITS:
    enc, inv, _ = quantizers.act_encoding(name, act_q, layer.get("act_quant"), a_bits,
                                          info.in_shape)
  codes = s_w = None
  if w_bits < FLOAT_BITS:
    codes, s_w = quantizers.weight_codes(name, weight_q, layer.get("weight_quant", {}),
                                         kernel, w_bits)
  if is_float(w_bits, a_bits):
    return _float_layer(lowering, info, x, enc, inv, kernel if codes is None else codes * s_w,
                        mul, add)
  x_node = lowering.to_integer(x, enc, inv, f"{name}:in")
  qmin, qmax = enc.qrange
  max_dev = max(abs(qmin - enc.zero_point), abs(qmax - enc.zero_point))
  s_x = float(enc.scale) if float(enc.scale) > 0 else 1.0
  positive = s_w[s_w > 0]
  s_w = np.where(s_w > 0, s_w, positive.max() if positive.size else 1.0).astype(np.float32)
  codes = np.where(mul == 0, 0, codes).astype(np.int8)  # gamma 0: the bias alone
  mul = np.where(mul == 0, 1.0, mul)
  step = s_x * s_w.astype(np.float64) * mul  # [C], real value of one product unit
  products = np.abs(codes.astype(np.int64)).reshape(-1, channels).sum(0) * max_dev  # [C]
  shift = _acc_shift(products, np.abs(add / step))
  if shift is None:
    raise ValueError(f"deploy: layer {name!r}: its int32 accumulator may overflow "
                     f"(bound {np.max(products + np.abs(add / step)):.3g}); allowed: below 2^30")
  acc_scale = step / 2.0**shift
  bias_int = np.round(add / acc_scale)
  reach = products * 2**shift + np.abs(bias_int)  # [C], in accumulator steps
  out = Encoding(bits=32, signed=True, scale=acc_scale.astype(np.float32), zero_point=0,
                 dtype="int32", axis=-1)
  arrays = {"weight": codes, "weight_scale": s_w, "bias": bias_int.astype(np.int32),
            "acc_shift": np.int32(shift), "bn_mul": mul.astype(np.float32)}
  lowering.emit(Node(name=name, op=info.kind, inputs=(x_node,), attrs=_geometry(info),
                     arrays=arrays, encoding=out))
  return Value("acc", name, acc_scale, float(np.max(reach * np.abs(acc_scale))))


def _float_layer(lowering: Any, info: LayerInfo, x: Value, enc: Encoding | None,
                 inv: np.float32 | None, kernel: np.ndarray, mul: np.ndarray,
                 add: np.ndarray) -> Value:
  """A 32-bit layer: float input (its codes dequantized), float kernel."""
  name = info.name
  if enc is not None:
    codes = lowering.to_integer(x, enc, inv, f"{name}:in")
    x_node = lowering.emit(Node(name=f"{name}:in_float", op="dequantize", inputs=(codes,)))
    qmin, qmax = enc.qrange
    in_bound = max(abs(qmin - enc.zero_point), abs(qmax - enc.zero_point)) * float(enc.scale)
  else:
    x_node = lowering.to_float(x, f"{name}:in_float")
    in_bound = x.bound
  kernel = np.asarray(kernel, np.float32)
  arrays = {"kernel": kernel, "mul": mul.astype(np.float32), "bias": add.astype(np.float32),
            "lo": np.float32(-np.inf), "hi": np.float32(np.inf)}
  lowering.emit(Node(name=name, op=f"float_{info.kind}", inputs=(x_node,),
                     attrs=_geometry(info), arrays=arrays))
  reach = np.abs(kernel.astype(np.float64)).reshape(-1, kernel.shape[-1]).sum(0)
  return Value("float", name, None, float(np.max(reach * in_bound * np.abs(mul) + np.abs(add))))
