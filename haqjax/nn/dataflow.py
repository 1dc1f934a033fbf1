"""What the traced computation of a quantized plain-flax model tells.

Two walks over the jaxpr of `haqjax.nn.quantized` models:

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

  def mark(x, tag):
    def ident(x):
      return x
    ident.__name__ = tag
    return jax.jit(ident)(x)

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
      args = (*args[:first], mark(args[first], tag), *args[first + 1:])
      return next_fun(*args, **kwargs)
    if isinstance(layer, LAYERS):
      tag = f"{_LAYER_MARK}{next(counter)}"
      marks[tag] = ("layer", tuple(module.scope.path), 0.0)
      return mark(next_fun(*args, **kwargs), tag)
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
