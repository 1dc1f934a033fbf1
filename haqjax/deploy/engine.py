"""Running an integer `Graph`: integer operands, int32 accumulation, jitted.

`run(graph, x)` executes the ops exactly as `haqjax.deploy.graph` documents
them. The compiled function takes the graph's arrays (codes, scales, zero
points, multipliers, shifts, clamp bounds) as arguments and only its
structure (`Graph.static_key`: ops, wiring, attributes, dtypes, shapes) as
static, so one compilation serves every policy of a model whose layers stay
integer (`trace_count()` counts the traces).

Convolutions and matrix products run on int8 operands with int32
accumulation (`preferred_element_type=jnp.int32`). Codes stored as uint8
are offset by -128 into int8 (as gemmlowp handles zero points): the
operand is `x - 128`, padded with `zx - 128` so that padding means real zero,
and `(128 - zx) * sum(weight[..., c])` is added back per output channel.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from haqjax.deploy import fixed_point
from haqjax.deploy.graph import Graph
from haqjax.typing import Array, ArrayLike

_DIMS = ("NHWC", "HWIO", "NHWC")
_TRACES = [0]


def trace_count() -> int:
  """How many times the engine's jitted function has been traced."""
  return _TRACES[0]


def _zero_point(graph: Graph, name: str) -> int:
  enc = graph.encoding(name)
  return 0 if enc is None else enc.zero_point


def graph_arrays(graph: Graph) -> dict[str, dict[str, np.ndarray]]:
  """Every node's arrays, with the zero points and scales the engine reads."""
  out = {}
  for node in graph.nodes:
    arrays = dict(node.arrays)
    enc_in = graph.encoding(node.inputs[0])
    arrays["zp_in"] = np.int32(_zero_point(graph, node.inputs[0]))
    arrays["zp_out"] = np.int32(0 if node.encoding is None else node.encoding.zero_point)
    if node.op == "dequantize":
      arrays["scale_in"] = enc_in.scale
    if node.op in ("conv", "dense"):
      w = node.arrays["weight"].astype(np.int32)
      arrays["weight_sum"] = w.reshape(-1, w.shape[-1]).sum(0).astype(np.int32)
    out[node.name] = {k: np.asarray(v) for k, v in arrays.items()}
  return out


def _structure(graph: Graph) -> tuple[Any, ...]:
  """The static part: per node (name, op, inputs, attrs, input and output dtypes)."""
  nodes = []
  for node in graph.nodes:
    enc_in = graph.encoding(node.inputs[0])
    dtype_in = "float32" if enc_in is None else enc_in.dtype
    dtype_out = "float32" if node.encoding is None else node.encoding.dtype
    attrs = tuple(sorted(node.attrs.items()))
    nodes.append((node.name, node.op, node.inputs, attrs, dtype_in, dtype_out))
  return (graph.input, graph.output, tuple(nodes))


def run(graph: Graph, x: ArrayLike, *, intermediates: bool = False
        ) -> Array | tuple[Array, dict[str, Array]]:
  """The graph's output for the float input `x` (NHWC batch).

  Args:
    graph: the integer graph.
    x: the input batch.
    intermediates: also return every node's output tensor by name.

  Returns:
    The float32 logits, and with `intermediates` a dict of all tensors.
  """
  keep = None if intermediates else (graph.output,)
  env = _execute(_structure(graph), keep, graph_arrays(graph), jnp.asarray(x, jnp.float32),
                 {})
  if intermediates:
    return env[graph.output], env
  return env[graph.output]


def run_forced(graph: Graph, x: ArrayLike, overrides: dict[str, ArrayLike]
               ) -> dict[str, Array]:
  """What the overridden nodes compute when their outputs are replaced.

  Every tensor named in `overrides` is replaced by the given one for the
  nodes downstream, and its own computed value (from its possibly replaced
  inputs) is returned under its name. `compare_codes` feeds the
  fake-quantized model's codes in this way so that each layer is compared on
  the same inputs.
  """
  names = tuple(sorted(overrides))
  overrides = {k: jnp.asarray(v) for k, v in overrides.items()}
  env = _execute(_structure(graph), tuple(f"{n}#computed" for n in names),
                 graph_arrays(graph), jnp.asarray(x, jnp.float32), overrides)
  return {n: env[f"{n}#computed"] for n in names}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _execute(structure: tuple[Any, ...], keep: tuple[str, ...] | None,
             arrays: dict[str, dict[str, Array]], x: Array, overrides: dict[str, Array]
             ) -> dict[str, Array]:
  """Runs the nodes; returns the tensors named in `keep` (None: all)."""
  _TRACES[0] += 1
  input_name, _, nodes = structure
  env = {input_name: x}
  for name, op, inputs, attrs, dtype_in, dtype_out in nodes:
    ins = [env[i] for i in inputs]
    env[name] = _OPS[op](ins, arrays[name], dict(attrs), dtype_in, dtype_out)
    if name in overrides:
      env[f"{name}#computed"] = env[name]
      env[name] = overrides[name].astype(env[name].dtype)
  return env if keep is None else {k: env[k] for k in keep}


def _clip_cast(v: Array, a: dict[str, Array], dtype_out: str) -> Array:
  return jnp.clip(v, a["lo"], a["hi"]).astype(dtype_out)


def _quantize(ins, a, attrs, dtype_in, dtype_out):
  v = jnp.round(ins[0].astype(jnp.float32) * a["inv_scale"])
  v = jnp.clip(v + a["zp_out"].astype(jnp.float32), a["lo"].astype(jnp.float32),
               a["hi"].astype(jnp.float32))
  return v.astype(dtype_out)


def _dequantize(ins, a, attrs, dtype_in, dtype_out):
  return (ins[0].astype(jnp.int32) - a["zp_in"]).astype(jnp.float32) * a["scale_in"]


def _int8_operand(x: Array, zp: Array, dtype_in: str) -> tuple[Array, Array, Array]:
  """`(x8, pad value, correction factor)`: `x - zp == x8 + factor`, pad means zero."""
  offset = 128 if dtype_in == "uint8" else 0
  x8 = (x.astype(jnp.int32) - offset).astype(jnp.int8)
  return x8, (zp - offset).astype(jnp.int8), (offset - zp).astype(jnp.int32)


def _conv(ins, a, attrs, dtype_in, dtype_out):
  x8, pad_value, factor = _int8_operand(ins[0], a["zp_in"], dtype_in)
  (top, bottom), (left, right) = attrs["padding"]
  config = ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
  x8 = jax.lax.pad(x8, pad_value, config)
  acc = jax.lax.conv_general_dilated(
      x8, a["weight"], window_strides=tuple(attrs["strides"]), padding="VALID",
      dimension_numbers=_DIMS, feature_group_count=attrs["groups"],
      preferred_element_type=jnp.int32)
  return ((acc + factor * a["weight_sum"]) << a["acc_shift"]) + a["bias"]


def _dense(ins, a, attrs, dtype_in, dtype_out):
  x8, _, factor = _int8_operand(ins[0], a["zp_in"], dtype_in)
  acc = jnp.dot(x8, a["weight"], preferred_element_type=jnp.int32)
  return ((acc + factor * a["weight_sum"]) << a["acc_shift"]) + a["bias"]


def _requantize(ins, a, attrs, dtype_in, dtype_out):
  v = ins[0].astype(jnp.int32) - a["zp_in"]
  if attrs.get("rounding", "gemmlowp") == "single":
    v = fixed_point.single_rounding_multiply(v, a["multiplier"], a["shift"])
  else:
    v = fixed_point.multiply_by_quantized_multiplier(v, a["multiplier"], a["shift"])
  zp = a["zp_out"]
  return (jnp.clip(v, a["lo"] - zp, a["hi"] - zp) + zp).astype(dtype_out)


def _add(ins, a, attrs, dtype_in, dtype_out):
  return _clip_cast(ins[0] + ins[1], a, dtype_out)


def _clamp(ins, a, attrs, dtype_in, dtype_out):
  return _clip_cast(ins[0], a, dtype_out)


def _max_pool(ins, a, attrs, dtype_in, dtype_out):
  x = ins[0]
  init = jnp.array(jnp.iinfo(x.dtype).min, x.dtype)
  window = (1, *attrs["window"], 1)
  strides = (1, *attrs["strides"], 1)
  padding = ((0, 0), *attrs["padding"], (0, 0))
  return jax.lax.reduce_window(x, init, jax.lax.max, window, strides, padding)


def _mean(ins, a, attrs, dtype_in, dtype_out):
  return jnp.sum(ins[0].astype(jnp.int32) - a["zp_in"], axis=(1, 2), dtype=jnp.int32)


def _reshape(ins, a, attrs, dtype_in, dtype_out):
  x = ins[0]
  return x.reshape((x.shape[0], *attrs["shape"]))


def _float_tail(y: Array, a: dict[str, Array]) -> Array:
  return jnp.clip(y * a["mul"] + a["bias"], a["lo"], a["hi"])


def _float_conv(ins, a, attrs, dtype_in, dtype_out):
  y = jax.lax.conv_general_dilated(
      ins[0], a["kernel"], window_strides=tuple(attrs["strides"]),
      padding=tuple(tuple(p) for p in attrs["padding"]), dimension_numbers=_DIMS,
      feature_group_count=attrs["groups"], precision=jax.lax.Precision.HIGHEST)
  return _float_tail(y, a)


def _float_dense(ins, a, attrs, dtype_in, dtype_out):
  y = jnp.dot(ins[0], a["kernel"], precision=jax.lax.Precision.HIGHEST)
  return _float_tail(y, a)


_OPS = {"quantize": _quantize, "dequantize": _dequantize, "conv": _conv, "dense": _dense,
        "requantize": _requantize, "add": _add, "clamp": _clamp, "max_pool": _max_pool,
        "mean": _mean, "reshape": _reshape, "float_conv": _float_conv,
        "float_dense": _float_dense}
