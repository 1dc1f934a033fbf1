"""Calibration of a model's quantizers from data.

`calibrate(model, variables, batches, policy)` runs the model in floating
point over a few batches, records each quantizable layer's input, and calls
every layer's quantizers' `calibrate(params, x, bits)`: the weight quantizer
on the layer's kernel and the activation quantizer on the recorded inputs of
all batches (concatenated along the batch axis). This sets LSQ's initial step,
PACT's clip, k-means codebooks and static activation ranges before QAT or for
post-training quantization.

A plain flax model wrapped by `haqjax.nn.quantized` is calibrated the same
way: its intercepted ops (`haqjax.nn.intercept`) are recorded in place of
layers, a weighted op's quantizers calibrate on its input and kernel, and a
matmul of two activations calibrates its first operand's quantizer
(`act_quant`) for `a_bits` and its second's (`rhs_quant`) for `w_bits`, each
on that operand's recorded values.

`calibrate_candidates(model, variables, batches, policies)` calibrates once
per policy from one recording and stacks the results: a quantizer per
candidate bit-width for a differentiable bit search.

Both steps are compiled once per model and input shapes: a `Calibrator`
holds a model's two jitted functions, the recording of the layer inputs and
the quantizers' calibrations, which take the policy as data, so a search
that calibrates every episode's policy traces each of them once.
`calibrator(model)` returns the same `Calibrator` for equal models, and its
`trace_counts()` counts the traces. A quantizer whose `calibrate` branches in
Python on the data cannot be traced; it is calibrated outside `jit`, op by
op. (`StaticRange(sign='auto')`, which picks its grid from the data's sign,
traces: it fits both grids and selects inside the program.)
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from haqjax.nn import intercept
from haqjax.nn.bn_folding import folded_kernel_and_bias
from haqjax.nn.layers import QuantizedLayer
from haqjax.nn.layers import layer_name
from haqjax.nn.quantized import Quantized
from haqjax.nn.quantized import op_quantizers
from haqjax.policy import Policy
from haqjax.treeutil import copy_tree
from haqjax.treeutil import get_path
from haqjax.typing import Array, PyTree

# The quantizer parameters of each layer role, in the order calibrated; the
# last is the second operand of a matmul of two activations.
_ROLES = ("act_quant", "weight_quant", "rhs_quant")
# The roles calibrated on recorded activations.
_RECORDED = ("act_quant", "rhs_quant")
# What tracing a quantizer's `calibrate` raises when it needs concrete data.
_UNTRACEABLE = (jax.errors.ConcretizationTypeError,
                jax.errors.TracerArrayConversionError,
                jax.errors.TracerIntegerConversionError)
# Models whose Calibrator `calibrator` keeps (each holds compiled functions).
CACHED_MODELS = 8


class Calibrator:
  """The compiled-once calibration of one model's quantizers.

  Example::

      cal = calibrator(model)
      recorded = cal.record(variables, batches)
      for policy in policies:
        calibrated = cal(variables, None, policy, recorded=recorded)
      assert cal.trace_counts() == {"record": 1, "calibrate": 1}

  Attributes:
    model: the model (with its `quant_scheme`).
  """

  def __init__(self, model: nn.Module):
    self.model = model
    # name -> {"path", "quantizers", "bn"} of each quantizable layer, in call
    # order; set when the recording is traced.
    self._layers: dict[str, dict[str, Any]] = {}
    self._traceable: dict[tuple[str, str], bool] = {}
    self._traces = {"record": 0, "calibrate": 0}
    self._capture = jax.jit(self._capture_inputs)
    self._calibrate = jax.jit(self._calibrate_roles, static_argnames="roles")

  def trace_counts(self) -> dict[str, int]:
    """How often the recording and the calibration were traced.

    One each for any number of calls and policies on inputs of one shape
    (the calibration once more for each other choice of roles, e.g. weights
    only).
    """
    return dict(self._traces)

  def record(self, variables: PyTree, batches: Iterable[Any],
             only: str | None = None) -> dict[str, dict[str, Any]]:
    """Floating-point inputs and quantizers of each quantizable layer.

    Args:
      variables: the model's variables.
      batches: dicts with "image" and optionally "mask", or image arrays.
      only: the one layer whose inputs are kept (the others' are not moved
        to host memory); None: all layers.

    Returns:
      `{layer name: {"inputs": [N, ...] numpy array over all batches (masked
      padding rows dropped), "path": module path, "quantizers": (weight,
      act), "bn": (BN path, epsilon) of a folded BN, else None}}` in call
      order; a matmul of two activations also has "rhs_inputs", its second
      operand's values.

    Raises:
      ValueError: no batches, or `only` is not a quantizable layer.
    """
    found: dict[str, dict[str, Any]] | None = None
    for batch in batches:
      images = batch["image"] if isinstance(batch, dict) else batch
      mask = batch.get("mask") if isinstance(batch, dict) else None
      inputs, rhs = self._capture(variables, images)  # {name: [B, ...]} each
      if found is None:
        found = {name: {**info, "inputs": [], **({"rhs_inputs": []} if name in rhs else {})}
                 for name, info in self._layers.items()}
      keep = slice(None) if mask is None else np.asarray(mask, bool)
      for name, entry in found.items():
        if only is None or name == only:
          entry["inputs"].append(np.asarray(inputs[name])[keep])
          if name in rhs:
            entry["rhs_inputs"].append(np.asarray(rhs[name])[keep])
    if found is None:
      raise ValueError("calibration batches are empty; allowed: at least one batch")
    if only is not None and only not in found:
      raise ValueError(f"layer {only!r} is not a quantizable layer of the model; "
                       f"allowed: {', '.join(found)}")
    if only is not None:
      found = {only: found[only]}
    for entry in found.values():
      for key in ("inputs", "rhs_inputs"):
        if key in entry:
          entry[key] = np.concatenate(entry[key], axis=0)
    return found

  def __call__(self, variables: PyTree, batches: Iterable[Any] | None,
               policy: Policy, *, weights: bool = True, activations: bool = True,
               recorded: dict[str, dict[str, Any]] | None = None) -> PyTree:
    """`calibrate` for this model; see there."""
    if recorded is None:
      recorded = self.record(variables, batches)
    params = copy_tree(variables["params"])
    out = self._calibrated(variables, recorded, policy, weights, activations)
    for name, new in out.items():
      get_path(params, recorded[name]["path"]).update(new)
    return {**variables, "params": params}

  def candidates(self, variables: PyTree, batches: Iterable[Any] | None,
                 policies: Sequence[Policy],
                 recorded: dict[str, dict[str, Any]] | None = None) -> PyTree:
    """`calibrate_candidates` for this model; see there."""
    if not policies:
      raise ValueError("calibrate_candidates: no policies; allowed: at least one")
    if recorded is None:
      recorded = self.record(variables, batches)
    outs = [self._calibrated(variables, recorded, policy, True, True)
            for policy in policies]
    params = copy_tree(variables["params"])
    for name, roles in outs[0].items():
      get_path(params, recorded[name]["path"]).update({
          role: jax.tree.map(lambda *p: jnp.stack(p), *(out[name][role] for out in outs))
          for role in roles})
    return {**variables, "params": params}

  def _calibrated(self, variables: PyTree, recorded: dict[str, dict[str, Any]],
                  policy: Policy, weights: bool, activations: bool
                  ) -> dict[str, dict[str, PyTree]]:
    """`{layer: {role: parameters}}` of every quantizer with parameters, for `policy`."""
    for name, entry in recorded.items():
      self._layers.setdefault(name, {k: entry[k] for k in ("path", "quantizers", "bn")})
    params = variables["params"]
    traced, eager = [], []
    for name, entry in recorded.items():
      policy.index(name)  # A layer the policy lacks is an error, as in the model.
      for key in ("inputs", "rhs_inputs"):
        if key in entry and not np.all(np.isfinite(entry[key])):
          raise ValueError(f"calibration: the input of layer {name!r} has non-finite "
                           "values (NaN or Inf); allowed: finite activations")
      layer = _entry(params, entry["path"])  # {}: parameter-free quantizers
      for role, wanted in zip(_ROLES, (activations, weights, activations)):
        if wanted and role in layer:
          traceable = self._is_traceable(variables, _recorded(entry, role), policy,
                                         name, role)
          (traced if traceable else eager).append((name, role))
    inputs = {role: {name: _recorded(recorded[name], role) for name, r in traced
                     if r == role} for role in _RECORDED}
    out, finite = (self._calibrate(variables, inputs, policy, roles=tuple(traced))
                   if traced else ({}, {}))
    for name, role in eager:
      x = _recorded(recorded[name], role)
      x = None if x is None else jnp.asarray(x)
      out.setdefault(name, {})[role], finite[name, role] = self._calibrate_role(
          variables, x, policy, name, role)
    for (name, role), ok in finite.items():
      if not bool(ok):
        raise ValueError(f"calibration: the kernel of layer {name!r} has non-finite "
                         "values (NaN or Inf); allowed: finite weights")
    return out

  def _capture_inputs(self, variables: PyTree, images: Array
                      ) -> tuple[dict[str, Array], dict[str, Array]]:
    """The input of every quantizable layer, and the second operand of every
    matmul of two activations (traced; describes the layers)."""
    self._traces["record"] += 1
    layers: dict[str, dict[str, Any]] = {}
    captured: dict[str, Array] = {}
    rhs: dict[str, Array] = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if isinstance(module, QuantizedLayer) and context.method_name == "__call__":
        bn = kwargs.get("bn")
        name = layer_name(module)
        layers[name] = {
            "path": tuple(module.scope.path), "quantizers": module.quantizers(),
            # A folded-BN layer quantizes its kernel with the BN merged in.
            "bn": None if bn is None else (tuple(bn.scope.path), bn.epsilon)}
        captured.setdefault(name, args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor), intercept.recording() as calls:
      self.model.apply(variables, images, train=False)
    scheme = self.model.quant_scheme if isinstance(self.model, Quantized) else None
    for call in calls:
      site = call.site
      layers.setdefault(site.name, {
          "path": site.path, "quantizers": op_quantizers(scheme, site.name, site.kind),
          "bn": None})
      captured.setdefault(site.name, call.lhs)
      if site.kind == "matmul":
        rhs.setdefault(site.name, call.rhs)
    self._layers = layers
    return captured, rhs

  def _calibrate_roles(self, variables: PyTree, inputs: dict[str, dict[str, Array]],
                       policy: Policy, roles: tuple[tuple[str, str], ...]
                       ) -> tuple[dict[str, dict[str, PyTree]], dict[Any, Array]]:
    """New parameters of each `(name, role)` in `roles`, and kernel finiteness.

    `inputs[role][name]` holds the recorded values of each recorded role.
    """
    self._traces["calibrate"] += 1
    out: dict[str, dict[str, PyTree]] = {}
    finite: dict[Any, Array] = {}
    for name, role in roles:
      out.setdefault(name, {})[role], finite[name, role] = self._calibrate_role(
          variables, inputs.get(role, {}).get(name), policy, name, role)
    return out, finite

  def _calibrate_role(self, variables: PyTree, x: Array | None, policy: Policy,
                      name: str, role: str) -> tuple[PyTree, Array]:
    """`(parameters, finite)`: one quantizer calibrated (traceable)."""
    info = self._layers[name]
    weight_quantizer, act_quantizer = info["quantizers"]
    w_bits, a_bits = policy.bits_for(name)
    layer = get_path(variables["params"], info["path"])
    if role == "act_quant":  # `x` was checked on the host.
      return act_quantizer.calibrate(layer[role], x, a_bits), jnp.bool_(True)
    if role == "rhs_quant":  # A matmul's second operand, at the weights' bits.
      return weight_quantizer.calibrate(layer[role], x, w_bits), jnp.bool_(True)
    kernel = self._quantized_kernel(variables, layer, info)
    return (weight_quantizer.calibrate(layer[role], kernel, w_bits),
            jnp.all(jnp.isfinite(kernel)))

  @staticmethod
  def _quantized_kernel(variables: PyTree, layer: dict[str, Any],
                        info: dict[str, Any]) -> Array:
    """The kernel the weight quantizer sees: BN-folded for a folded-BN layer."""
    if info["bn"] is None:
      return layer["kernel"]
    path, eps = info["bn"]
    kernel, _ = folded_kernel_and_bias(
        layer["kernel"], get_path(variables["params"], path),
        get_path(variables["batch_stats"], path), eps)
    return kernel

  def _is_traceable(self, variables: PyTree, x: Any, policy: Policy, name: str,
                    role: str) -> bool:
    """Whether the `role` quantizer of layer `name` calibrates under `jit`."""
    if (name, role) not in self._traceable:
      try:
        jax.eval_shape(functools.partial(self._calibrate_role, name=name, role=role),
                       variables, x, policy)
        self._traceable[name, role] = True
      except _UNTRACEABLE:
        self._traceable[name, role] = False
    return self._traceable[name, role]


def _entry(params: PyTree, path: tuple[str, ...]) -> PyTree:
  """The parameters at `path`, or {} where there are none.

  A matmul of two activations whose quantizers have no parameters (min-max)
  stores no entry at all (`haqjax.nn.quantized`), so it has nothing to
  calibrate.
  """
  for key in path:
    if not isinstance(params, dict) or key not in params:
      return {}
    params = params[key]
  return params


def _recorded(entry: dict[str, Any], role: str) -> np.ndarray | None:
  """The recorded values a role calibrates on (None: the kernel, from params)."""
  return {"act_quant": entry.get("inputs"),
          "rhs_quant": entry.get("rhs_inputs")}.get(role)


@functools.lru_cache(maxsize=CACHED_MODELS)
def _shared_calibrator(model: nn.Module) -> Calibrator:
  return Calibrator(model)


def calibrator(model: nn.Module) -> Calibrator:
  """The `Calibrator` of `model`, the same for equal models.

  A model that cannot be hashed (e.g. a quantizer holding arrays) gets a new
  one, compiled anew.
  """
  try:
    hash(model)
  except TypeError:
    return Calibrator(model)
  return _shared_calibrator(model)


def clear_calibrators() -> None:
  """Forgets the shared `Calibrator`s (and their traces and compilations)."""
  _shared_calibrator.cache_clear()


def record_layer_inputs(model: nn.Module, variables: PyTree,
                        batches: Iterable[Array], only: str | None = None
                        ) -> dict[str, dict[str, Any]]:
  """Floating-point inputs and quantizers of each quantizable layer.

  `only` names one layer whose inputs are kept (the others' are skipped,
  which saves their transfer to host memory); all layers otherwise. See
  `Calibrator.record`.

  Returns:
    `{layer name: {"inputs": [N, ...] numpy array over all batches (masked
    padding rows dropped), "path": module path, "quantizers": (weight, act)}}`
    in call order.
  """
  return calibrator(model).record(variables, batches, only)


def calibrate(model: nn.Module, variables: PyTree, batches: Iterable[Array],
              policy: Policy, *, weights: bool = True, activations: bool = True,
              recorded: dict[str, dict[str, Any]] | None = None) -> PyTree:
  """Variables with every layer's quantizer parameters set from data.

  Compiled once per model and input shapes, for every policy (see
  `calibrator`).

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
    ValueError: no batches, non-finite activations or kernels (naming the
      layer), or a policy without one of the model's layers.
  """
  return calibrator(model)(variables, batches, policy, weights=weights,
                           activations=activations, recorded=recorded)


def calibrate_candidates(model: nn.Module, variables: PyTree, batches: Iterable[Array],
                         policies: Sequence[Policy]) -> PyTree:
  """Variables with one set of quantizer parameters per policy, stacked.

  The start of a differentiable search that keeps a quantizer per candidate
  bit-width (`haqjax.policy.SoftPolicy`'s `per_candidate`): every quantizer
  parameter of the model gets a leading `[K]` axis, `K = len(policies)`,
  whose entry `k` is what `calibrate(model, variables, batches, policies[k])`
  sets. The layer inputs are recorded once (in floating point, so they are
  the same for every policy) and the calibration is compiled once.

  Raises:
    ValueError: as `calibrate`, or no policies.
  """
  return calibrator(model).candidates(variables, batches, policies)
