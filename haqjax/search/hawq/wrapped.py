"""HAWQ's loss and trace point for a plain flax model (`haqjax.nn.quantized`).

A wrapped model has no `QConv`/`QDense` to intercept: its quantizable ops
are the sites of `haqjax.nn.intercept` (convolutions, dense layers and
matmuls of two activations). `layer_loss` runs the user's model in floating
point (`haqjax.nn.quantized.apply_float`) with, at every site, a zero
perturbation added to each operand that a policy quantizes:

* a weighted op (conv, depthwise, dense, einsum with a kernel): its kernel
  is replaced in the parameters, as for a haqjax layer (the point's
  "kernel" leaf), and its input perturbed ("input");
* a matmul of two activations (attention's `qk` and `pv`): it has no
  kernel. Its first operand, quantized to the layer's `a_bits`, is
  perturbed as a layer input ("input"); its second operand, which a policy
  quantizes to the layer's `w_bits` (with the activation quantizer), is
  perturbed too ("operand"). So its "weight" trace is the Hessian trace
  with respect to that second operand, and `Omega_w[l, w]` the second-order
  loss increase of quantizing it to `w` bits, the same estimate the kernel
  of a weighted op gets: the ILP trades a matmul's two widths against the
  others' by the loss they cost, with the cost model's charges for them.

The probes are drawn over the point's leaves as for a haqjax-layer model
(`{"input", "kernel"}`, plus "operand" only when the model has matmuls), so
a plain model and its haqjax-layer twin with the same layers, variables and
key get the same probes and traces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from haqjax.nn.quantized import Quantized
from haqjax.nn.quantized import apply_float
from haqjax.treeutil import copy_tree
from haqjax.treeutil import get_path
from haqjax.typing import Array
from haqjax.typing import PyTree

Criterion = Callable[[Array, Array], Array]


def site_shapes(model: Quantized, variables: PyTree, images: Array
                ) -> dict[str, tuple[str, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]:
  """`{op name: (kind, lhs shape, rhs shape)}` of every site, on `images` (abstract)."""
  found: dict[str, tuple[str, Any, Any]] = {}

  def run(v, x):
    def handle(site, lhs, rhs, compute):
      found.setdefault(site.name, (site.kind, jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
                                   jax.ShapeDtypeStruct(rhs.shape, rhs.dtype)))
      return compute(lhs, rhs)
    return apply_float(model, v, handle, x, train=False)

  jax.eval_shape(run, variables, images)
  return found


def trace_point(model: Quantized, variables: PyTree, names: tuple[str, ...],
                paths: dict[str, tuple[str, ...]], images: Array) -> PyTree:
  """The point whose Hessian blocks `hessian_traces` estimates, zero perturbations.

  Args:
    model: the wrapped model.
    variables: its variables.
    names: the ops, in call order.
    paths: each weighted op's module path (where its `kernel` is).
    images: one batch (its shape sets the perturbations').

  Returns:
    `{"kernel": {weighted op: kernel}, "input": {op: zeros like its first
    operand}}`, and `"operand": {matmul: zeros like its second operand}`
    when the model has matmuls of two activations.
  """
  shapes = site_shapes(model, variables, images)
  zeros = lambda s: jnp.zeros(s.shape, jnp.float32)
  matmuls = [n for n in names if shapes[n][0] == "matmul"]
  x = {"kernel": {n: get_path(variables["params"], paths[n])["kernel"] for n in names
                  if n not in matmuls},
       "input": {n: zeros(shapes[n][1]) for n in names}}
  if matmuls:
    x["operand"] = {n: zeros(shapes[n][2]) for n in matmuls}
  return x


def layer_loss(model: Quantized, variables: PyTree, paths: dict[str, tuple[str, ...]],
               criterion: Criterion) -> Callable[[PyTree, PyTree], Array]:
  """`loss(x, batch)`: the eval-mode float loss at the point `x` (`trace_point`).

  `x["kernel"][name]` replaces op `name`'s kernel; `x["input"][name]` is
  added to its first operand and `x["operand"][name]` to a matmul's second.
  """
  def loss(x: PyTree, batch: PyTree) -> Array:
    params = copy_tree(variables["params"])
    for name, kernel in x["kernel"].items():
      get_path(params, paths[name])["kernel"] = kernel
    operands = x.get("operand", {})

    def handle(site, lhs, rhs, compute):
      if site.name in x["input"]:
        lhs = lhs + x["input"][site.name].astype(lhs.dtype)
      if site.name in operands:
        rhs = rhs + operands[site.name].astype(rhs.dtype)
      return compute(lhs, rhs)

    logits = apply_float(model, {**variables, "params": params}, handle, batch["image"],
                         train=False)
    return criterion(logits, batch["label"])
  return loss
