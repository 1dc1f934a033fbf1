"""Calibration of a model's quantizers from data.

`calibrate(model, variables, batches, policy)` runs the model in floating
point over a few batches, records each quantizable layer's input, and calls
every layer's quantizers' `calibrate(params, x, bits)`: the weight quantizer
on the layer's kernel and the activation quantizer on the recorded inputs of
all batches (concatenated along the batch axis). This sets LSQ's initial step,
PACT's clip, k-means codebooks and static activation ranges before QAT or for
post-training quantization.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from haqjax.nn.bn_folding import folded_kernel_and_bias
from haqjax.nn.layers import QuantizedLayer
from haqjax.nn.layers import layer_name
from haqjax.policy import Policy
from haqjax.treeutil import copy_tree
from haqjax.treeutil import get_path
from haqjax.typing import Array, PyTree


def record_layer_inputs(model: nn.Module, variables: PyTree,
                        batches: Iterable[Array], only: str | None = None
                        ) -> dict[str, dict[str, Any]]:
  """Floating-point inputs and quantizers of each quantizable layer.

  `only` names one layer whose inputs are kept (the others' are skipped,
  which saves their transfer to host memory); all layers otherwise.

  Returns:
    `{layer name: {"inputs": [N, ...] numpy array over all batches (masked
    padding rows dropped), "path": module path, "quantizers": (weight, act)}}`
    in call order.
  """
  found: dict[str, dict[str, Any]] = {}
  apply = jax.jit(lambda v, x: _capture(model, v, x))
  for batch in batches:
    images = batch["image"] if isinstance(batch, dict) else batch
    mask = batch.get("mask") if isinstance(batch, dict) else None
    if not found:  # Names, paths and quantizers, from one small eager call.
      _describe(model, variables, images[:1], found)
    keep = slice(None) if mask is None else np.asarray(mask, bool)
    for (name, entry), x in zip(found.items(), apply(variables, images)):
      if only is None or name == only:
        entry["inputs"].append(np.asarray(x)[keep])
  if not found:
    raise ValueError("calibration batches are empty; allowed: at least one batch")
  if only is not None and only not in found:
    raise ValueError(f"layer {only!r} is not a quantizable layer of the model; "
                     f"allowed: {', '.join(found)}")
  for name, entry in list(found.items()):
    if only is not None and name != only:
      del found[name]
      continue
    entry["inputs"] = np.concatenate(entry["inputs"], axis=0)
  return found


def _describe(model: nn.Module, variables: PyTree, images: Array,
              found: dict[str, dict[str, Any]]) -> None:
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, QuantizedLayer) and context.method_name == "__call__":
      bn = kwargs.get("bn")
      found[layer_name(module)] = {
          "inputs": [], "path": tuple(module.scope.path),
          "quantizers": module.quantizers(),
          # A folded-BN layer quantizes its kernel with the BN merged in.
          "bn": None if bn is None else (tuple(bn.scope.path), bn.epsilon)}
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)


def _quantized_kernel(variables: PyTree, layer: dict[str, Any],
                      entry: dict[str, Any]) -> Array:
  """The kernel the weight quantizer sees: BN-folded for a folded-BN layer."""
  if entry.get("bn") is None:
    return layer["kernel"]
  path, eps = entry["bn"]
  kernel, _ = folded_kernel_and_bias(
      layer["kernel"], get_path(variables["params"], path),
      get_path(variables["batch_stats"], path), eps)
  return kernel


def _capture(model: nn.Module, variables: PyTree, images: Array) -> list[Array]:
  """The inputs of every quantizable layer, in call order (traceable)."""
  captured: list[Array] = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, QuantizedLayer) and context.method_name == "__call__":
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  return captured


def calibrate(model: nn.Module, variables: PyTree, batches: Iterable[Array],
              policy: Policy, *, weights: bool = True, activations: bool = True,
              recorded: dict[str, dict[str, Any]] | None = None) -> PyTree:
  """Variables with every layer's quantizer parameters set from data.

  Args:
    model: the model (with its `quant_scheme`).
    variables: `{"params": ..., "batch_stats": ...}` holding trained weights
      and initialised quantizer parameters.
    batches: calibration batches (dicts with "image" and optionally "mask",
      or image arrays); they are read once.
    policy: the bits each quantizer is calibrated for.
    weights, activations: which roles to calibrate.
    recorded: the `record_layer_inputs` of these batches, when already at
      hand (a search calibrating many policies records them once); `batches`
      is then not read.

  Returns:
    New variables; layers whose quantizers have no parameters are unchanged.

  Raises:
    ValueError: no batches, or non-finite activations (naming the layer).
  """
  if recorded is None:
    recorded = record_layer_inputs(model, variables, batches)
  params = copy_tree(variables["params"])
  for name, entry in recorded.items():
    w_bits, a_bits = policy.bits_for(name)
    wq, aq = entry["quantizers"]
    layer = get_path(params, entry["path"])
    x = entry["inputs"]
    if not np.all(np.isfinite(x)):
      raise ValueError(f"calibration: the input of layer {name!r} has non-finite values "
                       "(NaN or Inf); allowed: finite activations")
    if activations and "act_quant" in layer:
      layer["act_quant"] = aq.calibrate(layer["act_quant"], jnp.asarray(x), a_bits)
    if weights and "weight_quant" in layer:
      layer["weight_quant"] = wq.calibrate(layer["weight_quant"],
                                           _quantized_kernel(variables, layer, entry),
                                           w_bits)
  return {**variables, "params": params}

