"""What the traced computation of a quantized plain-flax model tells.

Three walks over the jaxpr of `haqjax.nn.quantized` models:

* `float_ops(closed)`: every product (`dot_general`, `conv_general_dilated`)
  that is not an intercepted op (`haqjax.nn.intercept.MARKER`): an `x @ y`
  written with the operator, a `nn.ConvTranspose`, a layer with its own
  `dot_general`. These run in floating point; the layer table lists them
  instead of dropping them.
* `conv_bn_pairs(model, variables, input_shape)`: each convolution or dense
  layer (linen's or NNX's) whose output is, unchanged, the input of a
  BatchNorm (`nn.BatchNorm`, `nnx.BatchNorm`), found by
  data flow (the BN's input is the layer's output in the traced program),
  not by names: what BN folding needs.
* `layer_chains(model, variables, input_shape)`: each pair of layers whose
  joining path (the first's BN, ReLU or ReLU6, per-channel pooling, read by
  nothing else) commutes with per-channel scaling: what cross-layer
  equalization needs.

Products are named by the module they run in (from the equations' name
stack) and their primitive, `<module path>/<primitive>_<i>` with `i`
counting that primitive's uncaptured calls in the module.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal
from jax.extend.core import jaxprs_in_params

from haqjax.nn.intercept import MARKER
from haqjax.nn.nnx_model import called_layer
from haqjax.typing import PyTree

PRODUCTS = ("dot_general", "conv_general_dilated")
# The layers and BatchNorms `conv_bn_pairs` pairs, linen's and NNX's.
LAYERS = (nn.Conv, nn.Dense, nnx.Conv, nnx.Linear)
BATCH_NORMS = (nn.BatchNorm, nnx.BatchNorm)
_BN_MARK = "haqjax_bn_input_"
_LAYER_MARK = "haqjax_layer_output_"


class FloatOp(NamedTuple):
  """A product left in floating point.

  Attributes:
    name: `<module path>/<primitive>_<i>`.
    primitive: 'dot_general' or 'conv_general_dilated'.
    macs: its multiply-accumulates (per example at batch 1).
  """
  name: str
  primitive: str
  macs: int


class BNPairPaths(NamedTuple):
  """A layer and the BatchNorm that reads its output.

  Attributes:
    path: the layer's module path.
    bn_path: the BatchNorm's module path.
    epsilon: the BatchNorm's epsilon.
  """
  path: tuple[str, ...]
  bn_path: tuple[str, ...]
  epsilon: float


def _named_identity(x, tag: str):
  """`x` through a jitted identity named `tag`: a mark the traced graph keeps."""
  def ident(x):
    return x
  ident.__name__ = tag
  return jax.jit(ident)(x)


def _macs(eqn: Any) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  out = eqn.outvars[0].aval.shape
  if eqn.primitive.name == "dot_general":
    (lc, _), _ = eqn.params["dimension_numbers"]
    return int(np.prod(out)) * int(np.prod([lhs[i] for i in lc]))
  dn = eqn.params["dimension_numbers"]
  per_output = int(np.prod([rhs[d] for d in dn.rhs_spec[1:]]))  # in/groups * window
  return int(np.prod(out)) * per_output


def _path(name_stack: str, skip: int) -> str:
  parts = [p for p in name_stack.split("/") if p][skip:]
  return "/".join(parts)


def float_ops(closed: Any, skip: int = 2) -> tuple[FloatOp, ...]:
  """The products of a traced program that are not intercepted ops.

  Args:
    closed: `jax.make_jaxpr` of the model's apply, traced inside
      `haqjax.nn.intercept.recording(mark=True)`.
    skip: leading name-stack entries that are not module paths (the
      wrapper's class name and its `model` field).

  Returns:
    The products in program order.
  """
  found: list[FloatOp] = []
  counts: dict[tuple[str, str], int] = {}

  def walk(jaxpr: Any, stack: str | None) -> None:
    for eqn in jaxpr.eqns:
      where = stack if stack is not None else str(eqn.source_info.name_stack)
      if str(eqn.params.get("name", "")).startswith(MARKER):
        continue
      prim = eqn.primitive.name
      if prim in PRODUCTS:
        path = _path(where, skip)
        i = counts.get((path, prim), 0)
        counts[path, prim] = i + 1
        name = f"{path}/{prim}_{i}" if path else f"{prim}_{i}"
        found.append(FloatOp(name, prim, _macs(eqn)))
      for sub in jaxprs_in_params(eqn.params):
        walk(sub, where)

  walk(closed.jaxpr, None)
  return tuple(found)


def conv_bn_pairs(model: nn.Module, variables: PyTree,
                  input_shape: Sequence[int], **call_kwargs: Any
                  ) -> tuple[BNPairPaths, ...]:
  """Each `nn.Conv`/`nn.Dense` whose output feeds an `nn.BatchNorm` directly.

  The same for an NNX model (`haqjax.nn.nnx_quantized`): each `nnx.Conv`/
  `nnx.Linear` feeding an `nnx.BatchNorm`, at their attribute paths.

  The model runs abstractly in eval mode (`train=False` unless given) with
  each layer's output and each BN's input passed through a marked identity;
  a pair is a BN whose input is a layer's output, as the traced program has
  it. A BN that normalises another axis than the last, or reads anything
  else (a sum, an activation), is not paired.

  Args:
    model: a flax module (e.g. a `haqjax.nn.quantized` model).
    variables: its variables (arrays or `jax.ShapeDtypeStruct`s).
    input_shape: the input's shape.
    **call_kwargs: other arguments of the model's `__call__`.

  Returns:
    The pairs, in the order their BatchNorms run.
  """
  counter = itertools.count()
  marks: dict[str, tuple[str, tuple[str, ...], float]] = {}

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    layer = called_layer(module)
    # An NNX layer's scope is called `(its call, *its args)`.
    first = 0 if layer is module else 1
    if isinstance(layer, BATCH_NORMS) and layer.axis in (-1,):
      tag = f"{_BN_MARK}{next(counter)}"
      marks[tag] = ("bn", tuple(module.scope.path), float(layer.epsilon))
      args = (*args[:first], _named_identity(args[first], tag), *args[first + 1:])
      return next_fun(*args, **kwargs)
    if isinstance(layer, LAYERS):
      tag = f"{_LAYER_MARK}{next(counter)}"
      marks[tag] = ("layer", tuple(module.scope.path), 0.0)
      return _named_identity(next_fun(*args, **kwargs), tag)
    return next_fun(*args, **kwargs)

  call_kwargs.setdefault("train", False)

  def forward(v, x):
    with nn.intercept_methods(intercept):
      return model.apply(v, x, **call_kwargs)

  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  closed = jax.make_jaxpr(forward)(variables, x)
  produced: dict[Any, tuple[str, ...]] = {}
  pairs: list[BNPairPaths] = []

  def walk(jaxpr: Any) -> None:
    for eqn in jaxpr.eqns:
      tag = str(eqn.params.get("name", ""))
      if tag in marks:
        kind, path, eps = marks[tag]
        if kind == "layer":
          produced[eqn.outvars[0]] = path
        elif eqn.invars[0] in produced:
          pairs.append(BNPairPaths(produced[eqn.invars[0]], path, eps))
        continue
      for sub in jaxprs_in_params(eqn.params):
        walk(sub)

  walk(closed.jaxpr)
  return tuple(pairs)


class LayerChain(NamedTuple):
  """Two layers joined by a path that commutes with per-channel scaling.

  Attributes:
    first: the module path of the layer whose output starts the path.
    second: the module path of the layer that reads its end.
    act: 'linear', 'relu' or 'relu6', the activation on the path.
  """
  first: tuple[str, ...]
  second: tuple[str, ...]
  act: str


class _Chain(NamedTuple):
  first: tuple[str, ...]
  act: str
  raw: bool  # Still the layer's output itself (no op applied yet).


def _literal(v: Any) -> float | None:
  if isinstance(v, Literal) and np.ndim(v.val) == 0:
    return float(v.val)
  return None


def _keeps_channels(eqn: Any, chain: _Chain) -> _Chain | None:
  """`chain` through `eqn` (one chained operand), or None where it stops."""
  prim = eqn.primitive.name
  ins, out = eqn.invars, eqn.outvars[0].aval
  if prim in ("convert_element_type", "reshape", "squeeze", "expand_dims"):
    same = ins[0].aval.shape[-1:] == out.shape[-1:] and len(out.shape) >= 1
    return chain._replace(raw=False) if same else None
  if prim == "reduce_sum":
    last = len(ins[0].aval.shape) - 1
    return None if last in eqn.params["axes"] else chain._replace(raw=False)
  if prim == "reduce_window_sum":
    ok = eqn.params["window_dimensions"][-1] == 1 and eqn.params["window_strides"][-1] == 1
    return chain._replace(raw=False) if ok else None
  others = [_literal(v) for v in ins[1:]] if prim == "div" else [
      _literal(v) for v in ins]
  if prim in ("div", "mul") and len(ins) == 2:
    consts = [c for c in others if c is not None]
    return chain._replace(raw=False) if consts and consts[0] > 0 else None
  if prim == "max" and 0.0 in others:
    return chain._replace(raw=False, act="relu" if chain.act == "linear" else chain.act)
  if prim == "min" and 6.0 in others and chain.act == "relu":
    return chain._replace(raw=False, act="relu6")
  return None


def layer_chains(model: nn.Module, variables: PyTree, input_shape: Sequence[int],
                 **call_kwargs: Any) -> tuple[LayerChain, ...]:
  """Layer pairs whose joining path commutes with per-channel scaling.

  The pairs cross-layer equalization can take (DFQ): a `nn.Conv`/`nn.Dense`
  (`nnx.Conv`/`nnx.Linear`) whose output reaches the input of another
  through only its own BatchNorm (one with `axis=-1` reading the layer's
  output directly, which folding makes a bias), ReLU or ReLU6 (max with 0,
  then min with 6), casts, reshapes that keep the channel axis last, sums
  over other axes and windowed sums (global and average pooling) and
  division or multiplication by a positive constant, each value on the path
  read by nothing else. A residual add, a concatenation, another
  activation, max pooling or a second reader ends the path: that pair is
  not listed, nor any pair of a layer that runs more than once (shared
  weights).

  Args:
    model: a flax module (e.g. a `haqjax.nn.quantized` model).
    variables: its variables (arrays or `jax.ShapeDtypeStruct`s).
    input_shape: the input's shape.
    **call_kwargs: other arguments of the model's `__call__`.

  Returns:
    The pairs, in the order their second layers run.
  """
  counter = itertools.count()
  marks: dict[str, tuple[str, tuple[str, ...]]] = {}

  def mark(x, kind, path):
    tag = f"haqjax_chain_{kind}_{next(counter)}"
    marks[tag] = (kind, path)
    return _named_identity(x, tag)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    layer = called_layer(module)
    first = 0 if layer is module else 1
    path = tuple(module.scope.path)
    if isinstance(layer, BATCH_NORMS) and layer.axis in (-1,):
      args = (*args[:first], mark(args[first], "bn_in", path), *args[first + 1:])
      return mark(next_fun(*args, **kwargs), "bn_out", path)
    if isinstance(layer, LAYERS):
      args = (*args[:first], mark(args[first], "in", path), *args[first + 1:])
      return mark(next_fun(*args, **kwargs), "out", path)
    return next_fun(*args, **kwargs)

  call_kwargs.setdefault("train", False)

  def forward(v, x):
    with nn.intercept_methods(intercept):
      return model.apply(v, x, **call_kwargs)

  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  closed = jax.make_jaxpr(forward)(variables, x)
  found: list[LayerChain] = []
  pending: dict[tuple[str, ...], _Chain] = {}

  def walk(jaxpr: Any, chains: dict[Any, _Chain]) -> dict[Any, _Chain]:
    uses: dict[Any, int] = {}
    for v in [v for e in jaxpr.eqns for v in e.invars] + list(jaxpr.outvars):
      if not isinstance(v, Literal):
        uses[v] = uses.get(v, 0) + 1
    alone = lambda v: not isinstance(v, Literal) and v in chains and uses[v] == 1
    for eqn in jaxpr.eqns:
      chained = [v for v in eqn.invars if alone(v)]
      tag = str(eqn.params.get("name", ""))
      if tag in marks:
        kind, path = marks[tag]
        if kind == "out":
          chains[eqn.outvars[0]] = _Chain(path, "linear", True)
        elif kind == "in" and chained:
          c = chains[chained[0]]
          found.append(LayerChain(c.first, path, c.act))
        elif kind == "bn_in" and chained and chains[chained[0]].raw:
          pending[path] = chains[chained[0]]
        elif kind == "bn_out" and path in pending:
          chains[eqn.outvars[0]] = pending.pop(path)._replace(raw=False)
        continue
      subs = list(jaxprs_in_params(eqn.params))
      call = (len(subs) == 1 and len(subs[0].invars) == len(eqn.invars)
              and len(subs[0].outvars) == len(eqn.outvars)
              and eqn.primitive.name in ("jit", "pjit", "custom_jvp_call",
                                         "custom_vjp_call", "closed_call"))
      if call:
        inner = {i: chains[o] for i, o in zip(subs[0].invars, eqn.invars) if alone(o)}
        inner = walk(subs[0], inner)
        for i, o in zip(subs[0].outvars, eqn.outvars):
          if i in inner:
            chains[o] = inner[i]
        continue
      for sub in subs:
        walk(sub, {})
      if len(chained) == 1 and len(eqn.outvars) == 1 and (
          sum(not isinstance(v, Literal) for v in eqn.invars) == 1):
        nxt = _keeps_channels(eqn, chains[chained[0]])
        if nxt is not None:
          chains[eqn.outvars[0]] = nxt
    outs = {}
    for v in jaxpr.outvars:
      if alone(v):
        outs[v] = chains[v]
    return outs

  walk(closed.jaxpr, {})
  # A layer run more than once shares its kernel between uses that the other
  # runs' paths may not allow: none of its pairs is listed.
  runs: dict[tuple[str, ...], int] = {}
  for kind, path in marks.values():
    if kind == "out":
      runs[path] = runs.get(path, 0) + 1
  return tuple(c for c in found if runs[c.first] == 1 and runs[c.second] == 1)
