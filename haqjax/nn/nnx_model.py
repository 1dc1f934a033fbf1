"""Quantize a Flax NNX model without editing it, with bits as data.

`nnx_quantized(model)` turns an NNX model the user wrote with flax's own
layers (`nnx.Conv` with any `feature_group_count`, `nnx.Linear`,
`nnx.LinearGeneral`, `nnx.Einsum`, `nnx.MultiHeadAttention`, products in
their own `nnx.Module`) into the same `haqjax.nn.Quantized` linen module that
`haqjax.nn.quantized` makes of a linen model, so the layer table, the
calibration, the trainer and the searches take it unchanged::

    qmodel = haqjax.nn.nnx_quantized(model, quant_scheme)
    variables = haqjax.nn.init_quantizers(qmodel, nnx_variables(model), x)
    table = haqjax.nn.layer_table(qmodel, x.shape)
    policy = haqjax.Policy.uniform(table.names, w_bits=4, a_bits=4)
    logits = qmodel.apply(variables, x, policy=policy, train=False)

Design: the NNX model is split once (`nnx.split`) into its graph and its
state; `FromNnx`, a linen module, holds both and its `__call__` is a pure
function of the linen variables: it merges them into a fresh copy of the
model and calls it. The variables are the NNX state in linen's layout (the
layout of `nnx.bridge.ToLinen`): one collection per variable type (`params`
for `nnx.Param`, `batch_stats` for `nnx.BatchStat`), nested by the NNX
attribute path, list indices as strings (`blocks/0/conv`). In that copy
every submodule's `__call__` runs inside a linen child module (`NnxCall`)
at the submodule's path, which tells `haqjax.nn.intercept` what to swap
(`intercepted_as`: as `nn.Conv`, `nn.Dense`, `nn.Einsum`,
`nn.MultiHeadDotProductAttention`, a user's module, or nothing for the
other flax layers). So the ops are the linen path's, op for op: the same
names (the NNX attribute paths: `attention/query`, `attention/qk`,
`attention/pv`, `block/einsum_0`), the same kinds and table rows, the
quantizer parameters beside the layer's own (`params/conv1/act_quant`),
`QuantRule` regexes on those paths, and one compilation for every policy.
The user's model is never mutated: the product functions that NNX layers
bind at construction (`nnx.Linear.dot_general`, `nnx.Conv.
conv_general_dilated`, `nnx.Einsum.einsum_op`) are, in the copy, looked up
at call time when they are flax's defaults, and `nnx.MultiHeadAttention`'s
default attention runs by its two einsums (`einsum_attention`: flax would
call `jax.nn.dot_product_attention` without dropout, whose products cannot
be intercepted), as linen's attention does.

`train` sets the copy's mode as NNX does (`module.train()` / `eval()`:
BatchNorm's running averages, dropout) and is passed to the model's own
mode argument when its `__call__` has one (`train_arg`, as
`haqjax.nn.quantized`). Updated `batch_stats` come back as linen's mutable
collections. Random streams (`nnx.Rngs` held by dropout layers) stay the
model's: a model that draws dropout masks draws the same ones each call.

A submodule called by a module that does not hold it runs as part of its
caller; a module's other methods (not `__call__`) run as part of the
module that calls them.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any

from flax import nnx
import flax.linen as nn
from flax.nnx import variablelib
from flax.nnx.nn.attention import dot_product_attention_weights
import jax
import jax.numpy as jnp

from haqjax.nn.intercept import ATTENTION_OPS
from haqjax.nn.intercept import MATMULS
from haqjax.nn.quantized import TRAIN_ARGS
from haqjax.nn.quantized import Quantized
from haqjax.nn.quantized import quantized
from haqjax.nn.quantized import train_argument
from haqjax.typing import Array, PyTree

# (NNX layer, attribute holding its product function, the intercepted name).
_BOUND_FUNCTIONS = ((nnx.Linear, "dot_general", "dot_general"),
                    (nnx.Conv, "conv_general_dilated", "conv_general_dilated"),
                    (nnx.Einsum, "einsum_op", "einsum"))
_LATE = {"dot_general": lambda *a, **k: jax.lax.dot_general(*a, **k),
         "conv_general_dilated": lambda *a, **k: jax.lax.conv_general_dilated(*a, **k),
         "einsum": lambda *a, **k: jnp.einsum(*a, **k)}
_ROUTING = threading.local()


def intercepted_as(module: nnx.Module) -> tuple[tuple[str, ...], str | None, tuple[str, ...]]:
  """`(functions swapped in its call, site kind, names of its first einsums)`."""
  if isinstance(module, nnx.Conv):
    return ("conv_general_dilated",), "conv", ()
  if isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
    return ("dot_general",), "dense", ()
  if isinstance(module, nnx.Einsum):
    return ("einsum",), "dense", ()
  if isinstance(module, nnx.MultiHeadAttention):
    named = module.attention_fn in (nnx.dot_product_attention, einsum_attention)
    return MATMULS, "matmul", ATTENTION_OPS if named else ()
  if type(module).__module__.startswith("flax."):
    return (), None, ()
  return MATMULS, "matmul", ()


def einsum_attention(query: Array, key: Array, value: Array, *args: Any,
                     **kwargs: Any) -> Array:
  """`nnx.dot_product_attention` by its two einsums (`qk`, `pv`), always.

  Without dropout flax calls `jax.nn.dot_product_attention`, whose products
  cannot be intercepted; this computes what its einsum path computes.
  """
  bound = inspect.signature(nnx.dot_product_attention).bind(query, key, value, *args,
                                                            **kwargs)
  bound.apply_defaults()
  a = dict(bound.arguments)
  query, key, value = a["promote_dtype"]((query, key, value), dtype=a["dtype"])
  if query.shape[-2] != value.shape[-2]:  # Grouped queries: flax's own einsums.
    return nnx.dot_product_attention(*bound.args, **bound.kwargs)
  del a["query"], a["key"], a["value"]
  weights = dot_product_attention_weights(query, key, **a)
  return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=a["precision"])


def _default(cls: type, attr: str) -> Any:
  return inspect.signature(cls.__init__).parameters[attr].default


def nnx_variables(model: nnx.Module | nnx.State) -> dict[str, PyTree]:
  """The NNX model's state as linen variables (`{'params': ..., 'batch_stats': ...}`).

  Args:
    model: an `nnx.Module`, or its state (`nnx.state(model)`).

  Returns:
    One collection per variable type, nested by attribute path; random-stream
    state (`nnx.RngState`) is left out; keys are strings.
  """
  state = model if isinstance(model, nnx.State) else nnx.state(model)
  out: dict[str, dict[str, Any]] = {}
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, nnx.RngState):
      continue
    col = variablelib.variable_name_from_type(type(var), allow_register=True)
    node = out.setdefault(col, {})
    for part in path[:-1]:
      node = node.setdefault(str(part), {})
    node[str(path[-1])] = var.get_value()
  return out


def nnx_update(model: nnx.Module, variables: PyTree) -> nnx.Module:
  """Writes linen-layout `variables` back into the NNX `model`, in place.

  The inverse of `nnx_variables`: each of the model's variables (`params`,
  `batch_stats`, ...) takes the array at its path, so fine-tuned or PTQ
  variables of `nnx_quantized(model)` run in the NNX model itself. Entries
  the model lacks (the quantizer parameters, `params/conv1/act_quant`) are
  left out: the NNX model computes in floating point.

  Returns:
    `model`.

  Raises:
    ValueError: `variables` lack one of the model's variables.
  """
  state = nnx.state(model, nnx.Not(nnx.RngState))
  flat = []
  for path, var in nnx.to_flat_state(state):
    col = variablelib.variable_name_from_type(type(var), allow_register=True)
    node = variables.get(col, {})
    for part in path:
      if part not in node and str(part) not in node:
        raise ValueError(f"variables lack {col}/{'/'.join(map(str, path))}; allowed: "
                         "variables of nnx_quantized(model) (e.g. haqjax.quantize's)")
      node = node[part] if part in node else node[str(part)]
    flat.append((path, var.replace(value=jnp.asarray(node))))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


class _Parts:
  """An NNX model's graph and state (hashed by identity: a linen field)."""

  def __init__(self, model: nnx.Module):
    self.graphdef, self.state = nnx.split(model)
    self.variables = nnx_variables(model)
    self.paths = [(path, variablelib.variable_name_from_type(type(v), allow_register=True))
                  for path, v in nnx.to_flat_state(self.state)
                  if not isinstance(v, nnx.RngState)]


class NnxCall(nn.Module):
  """A linen scope at an NNX submodule's path that runs its call.

  Attributes:
    intercepted_as: `(functions, kind, matmul names)` for
      `haqjax.nn.intercept`.
    layer: the NNX module whose call it runs (None: a level between a
      caller and the module it calls), for `called_layer`.
  """
  intercepted_as: tuple[Any, ...] = ((), None, ())
  layer: Any = None

  @nn.compact
  def __call__(self, fn, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


class _Routing:
  """Where each submodule of one merged copy runs: its path and linen scope."""

  def __init__(self, paths: dict[int, tuple[str, ...]], root: FromNnx):
    self.paths = paths
    # (path, linen module, intercepted_as) of the routed calls under way.
    self.stack: list[tuple[tuple[str, ...], nn.Module, tuple[Any, ...]]] = [
        ((), root, root.intercepted_as)]
    self.scopes: dict[tuple[int, str], NnxCall] = {}

  def child(self, parent: nn.Module, name: str, spec: tuple[Any, ...],
            layer: nnx.Module | None) -> NnxCall:
    """The linen child `name` of `parent`, one per name (a module called twice)."""
    key = (id(parent), name)
    if key not in self.scopes:
      self.scopes[key] = NnxCall(spec, layer, name=name, parent=parent)
    return self.scopes[key]


  def call(self, module: nnx.Module, original: Any, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> Any:
    path = self.paths.get(id(module))
    here, parent, caller_as = self.stack[-1]
    if path is None or path[:len(here)] != here or len(path) == len(here):
      return original(module, *args, **kwargs)
    spec = intercepted_as(module)

    def run(depth: int, parent: nn.Module):
      last = depth == len(path) - 1
      # A level between the caller and the module intercepts as the caller.
      scope = self.child(parent, path[depth], spec if last else caller_as,
                         module if last else None)
      if not last:
        return scope(lambda: run(depth + 1, scope))
      self.stack.append((path, scope, spec))
      try:
        return scope(functools.partial(original, module), *args, **kwargs)
      finally:
        self.stack.pop()

    return run(len(here), parent)


def called_layer(module: nn.Module) -> Any:
  """The NNX layer an `NnxCall` scope runs, else `module` itself.

  What passes that read a layer's configuration from the module of an
  intercepted call (BN pairs, PTQ's layer geometry) look at.
  """
  if isinstance(module, NnxCall) and module.layer is not None:
    return module.layer
  return module


_ROUTED: dict[type, type] = {}


def _routed_class(cls: type) -> type:
  """`cls` whose `__call__` runs through the active routing."""
  if cls not in _ROUTED:
    original = cls.__call__

    def __call__(self, *args, **kwargs):
      routing = getattr(_ROUTING, "active", None)
      if routing is None:
        return original(self, *args, **kwargs)
      return routing.call(self, original, args, kwargs)

    _ROUTED[cls] = type(cls.__name__, (cls,), {"__call__": __call__,
                                               "__module__": cls.__module__})
  return _ROUTED[cls]


class FromNnx(nn.Module):
  """An NNX model run as a pure linen module of its state; see the module docstring.

  Attributes:
    parts: the model's graph and initial state.
    intercepted_as: how the root model's own products are intercepted.
    model_train_arg: the model's `__call__` argument that `train` sets, or None.
    train_inverted: whether that argument means "not training".
    freeze_bn_stats: every `nnx.BatchNorm` uses its running statistics.
  """
  parts: _Parts
  intercepted_as: tuple[Any, ...]
  model_train_arg: str | None = None
  train_inverted: bool = False
  freeze_bn_stats: bool = False

  @nn.compact
  def __call__(self, *args: Any, train: bool | None = None, **kwargs: Any) -> Any:
    parts = self.parts
    if self.is_initializing():
      for col, tree in parts.variables.items():
        for key, value in tree.items():
          self.put_variable(col, key, value)
    # Fresh variables: the copy's updates (BN statistics, random-stream
    # counts) reach neither the template nor the caller's numpy arrays.
    flat = {path: v.replace(value=v.get_value())
            for path, v in nnx.to_flat_state(parts.state)}
    variables = self.variables
    for path, col in parts.paths:
      node = variables[col]
      for part in path:
        node = node[str(part)]
      flat[path] = flat[path].replace(value=jnp.asarray(node))
    state = nnx.from_flat_state(list(flat.items()))
    module = nnx.merge(parts.graphdef, state)
    paths: dict[int, tuple[str, ...]] = {}
    for path, node in nnx.iter_graph(module):
      if isinstance(node, nnx.Module):
        node.__class__ = _routed_class(type(node))
        for cls, attr, fn in _BOUND_FUNCTIONS:
          if isinstance(node, cls) and getattr(node, attr) is _default(cls, attr):
            setattr(node, attr, _LATE[fn])
        if (isinstance(node, nnx.MultiHeadAttention)
            and node.attention_fn is nnx.dot_product_attention):
          node.attention_fn = einsum_attention
        if path and id(node) not in paths:
          paths[id(node)] = tuple(str(p) for p in path)
    if train is not None:
      module.train() if train else module.eval()  # pylint: disable=expression-not-assigned
      if self.model_train_arg is not None:
        if self.model_train_arg in kwargs:
          raise ValueError(f"train={train} and {self.model_train_arg}="
                           f"{kwargs[self.model_train_arg]!r} are both given; "
                           "allowed: one of them")
        kwargs[self.model_train_arg] = (not train) if self.train_inverted else train
    if self.freeze_bn_stats:  # After `train()`, which sets it back.
      for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.BatchNorm):
          node.use_running_average = True
    previous = getattr(_ROUTING, "active", None)
    _ROUTING.active = _Routing(paths, self)
    try:
      out = module(*args, **kwargs)
    finally:
      _ROUTING.active = previous
    for col, tree in nnx_variables(module).items():
      if col != "params" and self.is_mutable_collection(col):
        for key, value in tree.items():
          self.put_variable(col, key, value)
    return out


def nnx_quantized(model: nnx.Module, quant_scheme: Any = None, *,
                  train_arg: str | None = "auto",
                  train_inverted: bool | None = None,
                  freeze_bn_stats: bool = False) -> Quantized:
  """An NNX `model` made quantizable by a policy at call time.

  Args:
    model: an `nnx.Module` written with flax's layers (it is not changed).
    quant_scheme: a `haqjax.quant.QuantScheme`; None: min-max fake-quant.
    train_arg: the model's `__call__` argument that `train` also sets:
      'auto' (the first of `TRAIN_ARGS` it takes), a name, or None. The
      model's mode (`train()` / `eval()`) is set either way.
    train_inverted: whether `train_arg` means "not training"; None: from
      its name.
    freeze_bn_stats: its `nnx.BatchNorm`s use and keep their running
      statistics in training too (QAT on frozen statistics).

  Returns:
    A `haqjax.nn.Quantized` module, called as `apply(variables, *args,
    policy=..., train=..., **kwargs)`, whose variables are
    `nnx_variables(model)` plus the quantizer parameters.

  Raises:
    ValueError: `model` is not an NNX module, or `train_arg` names no
      argument of its `__call__`.
  """
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model is a {type(model).__name__}; allowed: a flax.nnx Module")
  name = train_argument(model, train_arg)
  inverted = TRAIN_ARGS.get(name, False) if train_inverted is None else train_inverted
  inner = FromNnx(_Parts(model), intercepted_as(model), name, inverted, freeze_bn_stats)
  return quantized(inner, quant_scheme, train_arg="train", train_inverted=False,
                   freeze_bn_stats=freeze_bn_stats)
