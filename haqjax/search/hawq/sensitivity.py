"""HAWQ's layer sensitivities and the perturbation table `Omega[l, w, a]`.

HAWQ-V2/V3 rank layers by the trace of the training loss's Hessian with
respect to each layer's kernel, and score a bit-width by the second-order
loss increase it causes, with the quantization noise taken as isotropic:

    Omega_w[l, w] = Tr(H_w,l) / n_w,l * ||Q_w(W_l) - W_l||^2
                  = Tr(H_w,l) * mse_w[l, w]

(`mse` is the mean squared error per element, so `n` cancels). The traces
come from Hutchinson's estimator (`haqjax.search.hawq.hutchinson`) on the
FP32 model in eval mode (BatchNorm with its running statistics, as HAWQ's
PyTorch code, `model.eval()`), over a few training batches.
`curvature='gauss_newton'` takes the traces of the generalized Gauss-Newton
matrix instead (`haqjax.search.hawq.gauss_newton`): the Hessian less the
network's own second derivatives, positive semi-definite (so no layer gets
a negative sensitivity from a noisy estimate) and equal to the Hessian at
the classifier; one reverse pass per probe and, on the quickstart CNN, 1/100
or less of Hutchinson's variance per probe for the layer inputs and 1/2 to
1/20 for the kernels.

Activations. HAWQ-V3 scores weights only (its activations follow a fixed
rule). Here a layer's activation bits are scored the same way, by the
Hessian with respect to the layer's input: a zero perturbation `e_l` is
added to every quantizable layer's input (`flax.linen.intercept_methods`),
and its Hessian block traces come out of the same probes as the kernels'.
With the loss a mean over the batch and BatchNorm in eval mode, that block
is `1/B` times the per-example input Hessians, so

    Omega_a[l, a] = Tr(H_e,l) / n_e,l * ||Q_a(X_l) - X_l||^2
                  = Tr(H_e,l) * mse_a[l, a]

is the same second-order estimate as the weight term, for the noise the
activation quantizer adds to the batch's inputs `X_l` (`n_e,l` elements).
Both terms are in units of the loss, so they add:
`Omega[l, w, a] = Omega_w[l, w] + Omega_a[l, a]`. A gradient-squared
(empirical Fisher) proxy would have needed no second derivatives, but it is
not the Hessian of a network off a minimum, and the exact input Hessian costs one
more leaf per layer in each Hessian-vector product, which the forward pass
computes anyway.

The errors (`haqjax.search.hawq.errors`) use each layer's own quantizers
(`QuantizedLayer.quantizers()`), calibrated for each bit-width as QAT's
calibration does: the weight quantizer on the kernel, the activation
quantizer on the inputs of all the batches (a dynamic one, e.g. min-max,
then takes each batch's own range).
With `fold_bn` the deployed kernel is the BN-folded one; the error here is
the raw kernel's, which the trace refers to.

A plain flax model wrapped by `haqjax.nn.quantized` is measured the same
way on its intercepted ops (`haqjax.search.hawq.wrapped`). A matmul of two
activations has no kernel: its "weight" trace and error are those of its
second operand, which the policy quantizes to the layer's `w_bits` with
the activation quantizer (calibrated per batch, as activations), so
`Omega[l, w, a]` of a matmul is the loss increase of quantizing its second
operand to `w` bits and its first to `a` bits.

Per channel (`granularity='channel'`). HAWQ's noise is isotropic over a
whole tensor: one trace times the tensor's mean squared error. Where the
curvature and the error are spread unevenly over channels that fails. On
MobileNetV2 a channel that the ReLU before a depthwise layer leaves at zero
on every input has a zero running variance in the BatchNorm after it, which
then scales that channel by `gamma / sqrt(eps)`: the input trace is 10^4-10^5
times the other layers', all of it in channels that quantization maps to
zero exactly (no error), and the per-tensor product charges it to every
bit-width. Splitting both factors over the channels (a kernel's output
channels, an input's channels; `hutchinson`'s `channels`) gives

    Omega_w[l, w] = sum_c Tr(H_w,l,c) * mse_w[l, c, w]

and the same for activations; `weight_mse` and `activation_mse` then hold
the trace-weighted errors `sum_c Tr_c mse_c / sum_c Tr_c` (the plain mean
where the traces sum to zero or less), so `Omega = Tr * mse` holds for both
granularities. Channels of one tensor have equal element counts, so equal
channel traces give HAWQ's table again.

The table has the cost table's axes (`haqjax.hardware.budget.TABLE_BITS`:
1..8 and 32; `budget.table_index`), `+inf` at bit-widths that were not
candidates and 0 error at 32 bits (floating point).

References:
  Dong et al. HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural
  Networks. NeurIPS 2020. https://arxiv.org/abs/1911.03852
  Yao et al. HAWQ-V3: Dyadic Neural Network Quantization. ICML 2021.
  https://arxiv.org/abs/2011.10680
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import depthwise
from haqjax.nn.layers import QConv
from haqjax.nn.layers import QuantizedLayer
from haqjax.nn.layers import layer_name
from haqjax.nn.quantized import Quantized
from haqjax.search.hawq import gauss_newton
from haqjax.search.hawq.errors import channel_weighted  # noqa: F401 (part of this API)
from haqjax.search.hawq.errors import quantization_mse  # noqa: F401 (part of this API)
from haqjax.search.hawq import hutchinson
from haqjax.search.hawq import wrapped
from haqjax.search.hawq.config import CURVATURES
from haqjax.treeutil import copy_tree
from haqjax.treeutil import get_path
from haqjax.typing import Array
from haqjax.typing import PRNGKey
from haqjax.typing import PyTree


@dataclasses.dataclass(frozen=True)
class Traces:
  """Hessian traces of the loss per quantizable layer, in layer-table order.

  Attributes:
    names: layer names.
    weight: `[L]` Tr(H) with respect to each layer's kernel.
    (`weight_channels`, `activation_channels`: per layer, the same split over
    its channels, `[C_l]`, or None.)
    activation: `[L]` Tr(H) with respect to a perturbation of each layer's
      input (one batch: `[B, ...]`).
    weight_count: `[L]` kernel elements.
    activation_count: `[L]` input elements of one batch.
    iterations: estimator iterations run.
    probes: probes per batch in all (iterations x probes per iteration).
    converged: whether the tolerance ended the estimate (not the cap).
    seconds: wall time of the estimate, compilation included.
    curvature: 'hessian' or 'gauss_newton' (see `hessian_traces`).
    weight_error: `[L]` the standard errors of `weight` (None: not known).
    activation_error: `[L]` the standard errors of `activation`.
  """
  names: tuple[str, ...]
  weight: np.ndarray
  activation: np.ndarray
  weight_count: np.ndarray
  activation_count: np.ndarray
  iterations: int
  probes: int
  converged: bool
  seconds: float
  curvature: str = "hessian"
  weight_error: np.ndarray | None = None
  activation_error: np.ndarray | None = None
  weight_channels: tuple[np.ndarray, ...] | None = None
  activation_channels: tuple[np.ndarray, ...] | None = None


def _cross_entropy(logits: Array, labels: Array, label_smoothing: float) -> Array:
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def plain_convolutions(next_fun, args, kwargs, context):
  """A `flax.linen.intercept_methods` interceptor: `QConv`s convolve with XLA's op.

  `QConv` convolves through `jax.custom_vjp` functions (fast CPU gradients,
  `haqjax.nn.batching`), which have no forward mode and no second
  derivative. Under this interceptor its convolution step (the method
  `_conv`, which receives the already quantized input and kernel) is
  `jax.lax.conv_general_dilated` with the layer's own strides, padding and
  groups (a depthwise one over its taps, `haqjax.nn.depthwise` with
  autodiff's gradients, which JAX batches over probes where the weights
  carry a sharding): the same values to float32 summation order,
  differentiable to any order in both modes.
  """
  module = context.module
  if not (isinstance(module, QConv) and context.method_name == "_conv"):
    return next_fun(*args, **kwargs)
  x, kernel = args
  strides = ((module.strides,) * 2 if isinstance(module.strides, int)
             else tuple(module.strides))
  padding = module.padding if isinstance(module.padding, str) else tuple(
      tuple(p) for p in module.padding)
  if depthwise.is_depthwise(x.shape, kernel.shape, module.feature_group_count):
    # Over the taps: JAX cannot batch the kernel gradient of a grouped
    # convolution over probes once the weights carry a sharding (a mesh).
    return depthwise.depthwise_conv(x.astype(module.dtype), kernel.astype(module.dtype),
                                    window_strides=strides, padding=padding,
                                    custom_gradient=False)
  return jax.lax.conv_general_dilated(
      x.astype(module.dtype), kernel.astype(module.dtype), window_strides=strides,
      padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=module.feature_group_count)


def layer_loss(model: nn.Module, variables: PyTree, paths: dict[str, tuple[str, ...]],
               label_smoothing: float = 0.0, criterion=None):
  """`loss(x, batch)`: the eval-mode loss with `x = {"kernel", "input"}` per layer.

  `x["kernel"][name]` replaces layer `name`'s kernel and `x["input"][name]`
  (shaped like its input) is added to its input; `paths` maps layer names to
  module paths. Convolutions run as `plain_convolutions`, so the loss has a
  forward-over-reverse Hessian-vector product. `criterion(logits, labels)`
  replaces the cross-entropy (`lambda z, y: z` gives the logits).
  """
  if criterion is None:
    criterion = functools.partial(_cross_entropy, label_smoothing=label_smoothing)

  def loss(x: PyTree, batch: PyTree) -> Array:
    params = copy_tree(variables["params"])
    for name, kernel in x["kernel"].items():
      get_path(params, paths[name])["kernel"] = kernel

    def perturb(next_fun, args, kwargs, context):
      if isinstance(context.module, QuantizedLayer) and context.method_name == "__call__":
        name = layer_name(context.module)
        if name in x["input"]:
          args = (args[0] + x["input"][name].astype(args[0].dtype), *args[1:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(perturb), nn.intercept_methods(plain_convolutions):
      logits = model.apply({**variables, "params": params}, batch["image"], policy=None,
                           train=False)
    return criterion(logits, batch["label"])
  return loss


def record(model: nn.Module, variables: PyTree, batches: Sequence[PyTree]
           ) -> dict[str, dict[str, Any]]:
  """Each quantizable layer's inputs, module path and quantizers (call order).

  See `haqjax.nn.calibrate.record_layer_inputs`.
  """
  return calibrate_lib.record_layer_inputs(model, variables, batches)


def hessian_traces(key: PRNGKey, model: nn.Module, variables: PyTree,
                   batches: Sequence[PyTree], *, probes: int, tol: float,
                   max_iterations: int, label_smoothing: float = 0.0,
                   recorded: dict[str, dict[str, Any]] | None = None,
                   curvature: str = "hessian", channels: bool = False) -> Traces:
  """Per-layer Hessian traces of the loss (kernels and inputs) on `batches`.

  Args:
    key: the estimator's key (`hutchinson.estimator` folds it per iteration).
    model: the model; run in floating point (`policy=None`), eval mode.
    variables: its variables (FP32 weights).
    batches: training batches of one shape, `{"image", "label"}`.
    probes: Rademacher probes per iteration and batch (vmapped together).
    tol: the estimate ends once every trace's standard error is at most
      `tol` times its magnitude (`hutchinson`'s stopping rule).
    max_iterations: the cap on iterations.
    label_smoothing: the training loss's label smoothing.
    recorded: `record(model, variables, batches)` when at hand.
    curvature: 'hessian' (Hutchinson's estimator on the Hessian, HAWQ's) or
      'gauss_newton' (the generalized Gauss-Newton matrix,
      `haqjax.search.hawq.gauss_newton`: positive semi-definite, the
      Hessian without the network's own second derivatives, estimated
      with far less variance per probe).
    channels: also the traces per channel (the module doc's `granularity`).

  Returns:
    The traces, in the model's call order (its layer table's).
  """
  if curvature not in CURVATURES:
    raise ValueError(f"curvature={curvature!r}; allowed: {', '.join(CURVATURES)}")
  if not max_iterations >= 1:
    raise ValueError(f"max_iterations={max_iterations!r}; allowed: >= 1")
  if not tol >= 0:
    raise ValueError(f"tol={tol!r}; allowed: >= 0")
  batches = list(batches)
  recorded = record(model, variables, batches) if recorded is None else recorded
  names = tuple(recorded)
  paths = {name: recorded[name]["path"] for name in names}
  if curvature == "gauss_newton":
    criterion = lambda logits, labels: logits
  else:
    criterion = functools.partial(_cross_entropy, label_smoothing=label_smoothing)
  if isinstance(model, Quantized):
    x = wrapped.trace_point(model, variables, names, paths, batches[0]["image"])
    loss = wrapped.layer_loss(model, variables, paths, criterion)
  else:
    size = int(np.shape(batches[0]["label"])[0])
    x = {"kernel": {n: get_path(variables["params"], paths[n])["kernel"] for n in names},
         "input": {n: jnp.zeros((size, *recorded[n]["inputs"].shape[1:]), jnp.float32)
                   for n in names}}
    loss = layer_loss(model, variables, paths, criterion=criterion)
  if curvature == "gauss_newton":
    estimate = gauss_newton.estimator(loss, probes=probes, channels=channels)
  else:
    estimate = hutchinson.estimator(loss, probes=probes, channels=channels)
  t0 = time.perf_counter()
  out = estimate(key, x, [{"image": b["image"], "label": b["label"]} for b in batches],
                 tol, max_iterations)
  seconds = time.perf_counter() - t0
  # A matmul of two activations: its second operand's, which takes w_bits.
  second = lambda tree, n: tree["kernel"][n] if n in tree["kernel"] else tree["operand"][n]
  weight = lambda tree: np.array([second(tree, n) for n in names], np.float64)
  activation = lambda tree: np.array([tree["input"][n] for n in names], np.float64)
  by_channel = out.channel_traces
  return Traces(
      names=names, weight=weight(out.traces), activation=activation(out.traces),
      weight_error=weight(out.standard_errors),
      activation_error=activation(out.standard_errors),
      weight_count=np.array([second(x, n).size for n in names], np.int64),
      activation_count=np.array([x["input"][n].size for n in names], np.int64),
      iterations=out.iterations, probes=out.iterations * probes,
      converged=out.converged, seconds=seconds, curvature=curvature,
      weight_channels=None if by_channel is None else tuple(
          np.asarray(second(by_channel, n), np.float64) for n in names),
      activation_channels=None if by_channel is None else tuple(
          np.asarray(by_channel["input"][n], np.float64) for n in names))


def perturbation_table(traces: Traces, w_mse: np.ndarray, a_mse: np.ndarray) -> np.ndarray:
  """`Omega [L, 9, 9] = Tr(H_w) * mse_w[:, w] + Tr(H_e) * mse_a[:, a]` (+inf off candidates)."""
  def term(trace, mse):  # [L], [L, 9] -> [L, 9]
    return np.where(np.isfinite(mse), trace[:, None] * np.where(np.isfinite(mse), mse, 0),
                    np.inf)
  return term(traces.weight, w_mse)[:, :, None] + term(traces.activation, a_mse)[:, None, :]
