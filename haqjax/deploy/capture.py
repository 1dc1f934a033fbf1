"""The float dataflow of a haqjax model, captured from its jaxpr.

`capture(model, variables, example_input)` traces `model.apply(variables, x,
policy=None)` with `jax.make_jaxpr` while `flax.linen.intercept_methods`
marks every `QuantizedLayer` and `nn.BatchNorm` call: the module runs as
usual and its output then passes through a `jax.jit` identity
`haqjax_deploy_<i>(x, y) -> y`, one equation in the jaxpr that names the
module's input `x` and output `y`. In a `haqjax.nn.quantized` plain flax
model, each intercepted `nn.Conv` / `nn.Dense` call is marked as a layer
(`haqjax.deploy.layer_info.flax_layer_info`: its kernel, bias and quantizer
parameters sit where a `QConv`'s do), and the model runs with `train=False`.
An NNX model (`haqjax.nn.nnx_quantized`) delegates each layer's call to a
linen scope at its attribute path (`haqjax.nn.nnx_model.NnxCall`, called
with the layer's call and then its arguments): an `nnx.Conv` /
`nnx.Linear` / `nnx.BatchNorm` scope is marked as its linen twin is, with
the scope's path and the NNX layer's (`called_layer`) configuration, so the
NNX model lowers to its linen twin's graph. Walking the jaxpr back from the
output and stopping at those equations (only their `x` is followed) leaves
the operations between layers, which map to a small set of `Op`s:

* `input`; `layer` (a `QConv` / `QDense`, with its folded BN if any, or a
  wrapped model's `nn.Conv` / `nn.Dense`, `nnx.Conv` / `nnx.Linear`);
  `batch_norm` (a plain `nn.BatchNorm` or `nnx.BatchNorm` in eval mode);
* `clip`: `max(x, c)` / `min(x, c)` with a constant scalar (ReLU is
  `jax.nn.relu`'s `max(x, 0)`, ReLU6 a `min(., 6)` after it);
* `add` of two activations (residuals); `mean` (`reduce_sum` over H, W then
  a division by H * W: `jnp.mean(x, axis=(1, 2))`); `max_pool`
  (`reduce_window_max`); `reshape` (also `squeeze` and `expand_dims`);
* identities: `convert_element_type` to float32 and `copy` drop out.

Sub-jaxprs (`jit`, `custom_jvp_call`, `custom_vjp_call`, as in
`jax.nn.relu`) are walked recursively. Any other primitive on an activation
raises one `ValueError` naming the module it is in and the allowed ops.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from haqjax.deploy.layer_info import LayerInfo
from haqjax.deploy.layer_info import flax_kind
from haqjax.deploy.layer_info import flax_layer_info
from haqjax.deploy.layer_info import haqjax_layer_info
from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.nn.layers import QuantizedLayer
from haqjax.nn.layers import layer_name
from haqjax.nn.nnx_model import called_layer
from haqjax.nn.quantized import Quantized
from haqjax.typing import Array, PyTree

MARKER = "haqjax_deploy_"
# What an error message lists as supported between layers.
ALLOWED = ("QConv", "QDense", "nn.Conv / nn.Dense / nnx.Conv / nnx.Linear (wrapped)",
           "BatchNorm", "relu", "relu6 / min, max with a constant",
           "add", "mean over H, W", "max_pool", "reshape", "dropout (eval)")
_IDENTITY = ("convert_element_type", "copy", "copy_p", "optimization_barrier")
# The BatchNorms a `batch_norm` op reads (an NNX one through its `NnxCall` scope).
BATCH_NORMS = (nn.BatchNorm, nnx.BatchNorm)
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint")


class Op(NamedTuple):
  """One operation of the captured float dataflow.

  Attributes:
    kind: 'input', 'layer', 'batch_norm', 'clip', 'add', 'mean', 'max_pool'
      or 'reshape'.
    inputs: indices of the ops it reads.
    attrs: kind-specific: a layer's `LayerInfo` (`info`), a BN's `path` and
      `epsilon`, a clip's `lo`/`hi`, a pool's `window`/`strides`/`padding`.
    shape: the output shape (with the batch axis).
    where: the module it is in (for messages).
  """
  kind: str
  inputs: tuple[int, ...]
  attrs: dict[str, Any]
  shape: tuple[int, ...]
  where: str


class Captured(NamedTuple):
  """The captured dataflow: `ops` in topological order, `ops[output]` the logits."""
  ops: tuple[Op, ...]
  output: int


def _unsupported(where: str, what: str) -> ValueError:
  return ValueError(f"deploy: {where!r} uses {what}; allowed ops: {', '.join(ALLOWED)}")


def _bn_info(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
  """A BatchNorm's path and constants: an `nn.BatchNorm`, or an `nnx.BatchNorm`'s scope."""
  where = "/".join(module.scope.path)
  path = tuple(module.scope.path)
  module = called_layer(module)
  given = kwargs.get("use_running_average")
  running = (nn.merge_param("use_running_average", module.use_running_average, given)
             if isinstance(module, nn.Module) else
             module.use_running_average if given is None else given)
  if not running:
    raise ValueError(f"deploy: BatchNorm {where!r} uses batch statistics; allowed: "
                     "use_running_average=True (eval mode)")
  if module.axis not in (-1,):
    raise ValueError(f"deploy: BatchNorm {where!r} normalises axis {module.axis}; "
                     "allowed: -1 (channels)")
  return {"path": path, "epsilon": float(module.epsilon),
          "use_scale": bool(module.use_scale), "use_bias": bool(module.use_bias)}


def capture(model: nn.Module, variables: PyTree, example_input: Array) -> Captured:
  """The float dataflow of `model` on inputs shaped like `example_input`.

  Args:
    model: a model of haqjax layers, called as `model.apply(variables, x,
      policy=None)`, or a `haqjax.nn.quantized` plain flax model (called with
      `train=False` too).
    variables: its variables.
    example_input: an input batch (only its shape and dtype are used).

  Returns:
    The captured ops.

  Raises:
    ValueError: an operation outside `ALLOWED`, naming the module it is in.
  """
  marked: dict[str, tuple[str, Any]] = {}
  counter = itertools.count()
  wrapped = isinstance(model, Quantized)
  mode = {"train": False} if wrapped else {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    layer = called_layer(module)
    first = 0 if layer is module else 1  # An NNX layer's scope: `(its call, *its args)`.
    if isinstance(module, QuantizedLayer):
      if not isinstance(module, (QConv, QDense)):
        raise _unsupported(layer_name(module), f"the layer type {type(module).__name__}")
      entry = ("layer", haqjax_layer_info(module, args[first], kwargs))
    elif wrapped and flax_kind(module) is not None:
      entry = ("layer", flax_layer_info(module, args[first], model.quant_scheme))
    elif isinstance(layer, BATCH_NORMS):
      entry = ("batch_norm", _bn_info(module, kwargs))
    else:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    tag = f"{MARKER}{next(counter)}"
    marked[tag] = entry

    def mark(x, y):
      del x
      return y
    mark.__name__ = tag
    return jax.jit(mark)(args[first], y)

  def forward(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, policy=None, **mode)

  x = jnp.asarray(example_input)
  closed = jax.make_jaxpr(forward)(variables, x)
  # The name stack of a wrapped model's ops also holds the wrapper's field.
  root = (type(model).__name__, "model") if wrapped else (type(model).__name__,)
  walker = _Walker(marked, root=root)
  n_vars = len(jax.tree_util.tree_leaves(variables))
  invars = closed.jaxpr.invars
  env = {v: _Param() for v in invars[:n_vars]}
  env[invars[n_vars]] = walker.emit(Op("input", (), {}, tuple(x.shape), "input"))
  env.update({v: _Const(np.asarray(c)) for v, c in zip(closed.jaxpr.constvars, closed.consts)})
  (out,) = walker.walk(closed.jaxpr, env)
  if not isinstance(out, int):
    raise ValueError("deploy: the model's output does not depend on its input")
  seen = {v.name for _, v in marked.values() if isinstance(v, LayerInfo)}
  if len(seen) != sum(1 for k, _ in marked.values() if k == "layer"):
    raise ValueError("deploy: a layer is called more than once; allowed: each layer once")
  return Captured(tuple(walker.ops), out)


class _Param(NamedTuple):
  """A value computed from the variables only (not an activation)."""


class _Const(NamedTuple):
  value: np.ndarray


class _Sum(NamedTuple):
  """A `reduce_sum` over H, W waiting for its division by H * W."""
  src: int
  count: int
  shape: tuple[int, ...]


class _Walker:
  """Maps jaxpr equations on activations to `Op`s."""

  def __init__(self, marked: dict[str, tuple[str, Any]], root: tuple[str, ...]):
    self.marked = marked
    self.root = root
    self.ops: list[Op] = []

  def emit(self, op: Op) -> int:
    self.ops.append(op)
    return len(self.ops) - 1

  def where(self, eqn) -> str:
    stack = str(eqn.source_info.name_stack)
    parts = [p for p in stack.split("/") if p]
    if tuple(parts[:len(self.root)]) == self.root:
      parts = parts[len(self.root):]
    return "/".join(parts) or "model"

  def walk(self, jaxpr, env: dict) -> list[Any]:
    """The values of `jaxpr.outvars`, walking only the equations they need."""
    for eqn in _needed(jaxpr, self.marked):
      ins = [_read(env, v) for v in _followed(eqn, self.marked)]
      outs = self.equation(eqn, ins)
      for v, value in zip(eqn.outvars, outs):
        env[v] = value
    return [_read(env, v) for v in jaxpr.outvars]

  def equation(self, eqn, ins: list[Any]) -> list[Any]:
    prim = eqn.primitive.name
    name = eqn.params.get("name", "")
    if prim in ("jit", "pjit") and name in self.marked:
      kind, info = self.marked[name]
      src = ins[0]
      if not isinstance(src, int):
        raise ValueError(f"deploy: the input of {kind} {_name_of(info)!r} is not an activation")
      attrs = {"info": info} if kind == "layer" else dict(info)
      return [self.emit(Op(kind, (src,), attrs, tuple(eqn.outvars[0].aval.shape),
                           _name_of(info)))]
    if not any(isinstance(v, (int, _Sum)) for v in ins):
      return [_Param() for _ in eqn.outvars]  # Variables / constants only.
    where = self.where(eqn)
    if prim in _CALLS:
      sub = _sub_jaxpr(eqn)
      if sub is None:
        raise _unsupported(where, prim)
      inner, consts = sub
      n = len(inner.invars)
      sub_env = {v: x for v, x in zip(inner.invars, ins[len(ins) - n:])}
      sub_env.update({v: _Const(np.asarray(c)) for v, c in zip(inner.constvars, consts)})
      return self.walk(inner, sub_env)
    if any(isinstance(v, _Sum) for v in ins) and prim != "div":
      raise _unsupported(where, f"reduce_sum followed by {prim}")
    shape = tuple(eqn.outvars[0].aval.shape)
    if prim in _IDENTITY:
      if eqn.outvars[0].aval.dtype != jnp.float32:
        raise _unsupported(where, f"{prim} to {eqn.outvars[0].aval.dtype}")
      return [ins[0]]
    if prim in ("max", "min"):
      (act,), const = _split(ins, where, prim)
      bound = float(const)
      attrs = {"lo": bound, "hi": np.inf} if prim == "max" else {"lo": -np.inf, "hi": bound}
      return [self.emit(Op("clip", (act,), attrs, shape, where))]
    if prim == "add":
      if all(isinstance(v, int) for v in ins):
        return [self.emit(Op("add", tuple(ins), {}, shape, where))]
      raise _unsupported(where, "add of a constant or a parameter")
    if prim == "reduce_sum":
      (src,) = ins
      in_shape = self.ops[src].shape
      if len(in_shape) != 4 or tuple(eqn.params["axes"]) != (1, 2):
        raise _unsupported(where, f"reduce_sum over axes {eqn.params['axes']}")
      return [_Sum(src, in_shape[1] * in_shape[2], shape)]
    if prim == "div":
      total, divisor = ins
      if isinstance(total, _Sum) and isinstance(divisor, _Const) and (
          np.size(divisor.value) == 1 and float(divisor.value) == total.count):
        return [self.emit(Op("mean", (total.src,), {}, total.shape, where))]
      raise _unsupported(where, "div (other than a mean over H, W)")
    if prim == "reduce_window_max":
      return [self.emit(self._pool(eqn, ins, where, shape))]
    if prim in ("reshape", "squeeze", "expand_dims", "broadcast_in_dim") and (
        isinstance(ins[0], int) and np.prod(shape) == np.prod(self.ops[ins[0]].shape)):
      if shape[0] != self.ops[ins[0]].shape[0]:
        raise _unsupported(where, f"{prim} across the batch axis")
      return [self.emit(Op("reshape", (ins[0],), {"shape": shape[1:]}, shape, where))]
    raise _unsupported(where, prim)

  def _pool(self, eqn, ins, where, shape) -> Op:
    p = eqn.params
    window, strides = p["window_dimensions"], p["window_strides"]
    padding = tuple(tuple(int(a) for a in pair) for pair in p["padding"])
    dilated = any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"]))
    if (len(window) != 4 or window[0] != 1 or window[3] != 1 or strides[0] != 1
        or strides[3] != 1 or padding[0] != (0, 0) or padding[3] != (0, 0) or dilated):
      raise _unsupported(where, "reduce_window_max other than an NHWC spatial max pool")
    attrs = {"window": tuple(window[1:3]), "strides": tuple(strides[1:3]),
             "padding": padding[1:3]}
    return Op("max_pool", (ins[0],), attrs, shape, where)


def _name_of(info: Any) -> str:
  return info.name if isinstance(info, LayerInfo) else "/".join(info["path"])


def _read(env: dict, v) -> Any:
  if isinstance(v, Literal):
    return _Const(np.asarray(v.val))
  return env[v]


def _split(ins: list[Any], where: str, prim: str) -> tuple[list[int], float]:
  acts = [v for v in ins if isinstance(v, int)]
  consts = [v for v in ins if isinstance(v, _Const)]
  if len(acts) != 1 or len(consts) != 1 or np.size(consts[0].value) != 1:
    raise _unsupported(where, f"{prim} other than with a constant scalar")
  return acts, float(np.asarray(consts[0].value).reshape(()))


def _sub_jaxpr(eqn) -> tuple[Any, list[Any]] | None:
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    if hasattr(sub, "jaxpr"):  # ClosedJaxpr
      return sub.jaxpr, list(sub.consts)
    return sub, []
  return None


def _needed(jaxpr, marked: dict[str, Any]) -> list[Any]:
  """The equations the outputs depend on, in order; marked calls need only `x`."""
  producer = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.outvars:
      producer[v] = i
  need: set[int] = set()
  stack = [v for v in jaxpr.outvars if not isinstance(v, Literal)]
  while stack:
    v = stack.pop()
    i = producer.get(v)
    if i is None or i in need:
      continue
    need.add(i)
    stack.extend(v for v in _followed(jaxpr.eqns[i], marked)
                 if not isinstance(v, Literal))
  return [jaxpr.eqns[i] for i in sorted(need)]


def _followed(eqn, marked: dict[str, Any]) -> list[Any]:
  """The inputs of `eqn` that matter: only `x` of a marked module call."""
  if eqn.primitive.name in ("jit", "pjit") and eqn.params.get("name") in marked:
    return eqn.invars[:1]
  return eqn.invars
