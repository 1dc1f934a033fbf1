"""Bias correction: remove the mean output shift that weight rounding causes.

Quantizing a layer's weights `W -> W_q` shifts its expected output by
`E[W_q x] - E[W x] = (W_q - W) E[x]`, per output channel; the shift is
systematic (it does not average out over the batch) and accumulates through
depth. Subtracting it from the layer's bias removes it (DFQ section 4.2;
white paper section 4.2). Two ways to get it:

* empirical (`empirical_bias_correction`), from calibration data:
  `mode='output'` measures `E[y_q - y]` per output channel exactly (the
  layer run with `W_q` and with `W` on its recorded floating-point input,
  borders and strides included); `mode='input'` averages the input per
  channel and multiplies, `(W_q - W) E[x]` (DFQ's form; it ignores zero
  padding at the borders).
* analytic (`analytic_bias_correction`), data-free: the input of `second` in
  a pair `first -> act -> second` is `act(z)` with `z ~ N(beta, gamma^2)`
  per channel from `first`'s BN (`bn_output_stats`, rescaled by
  equalization), so `E[x]` is the mean of a clipped normal:
  `E[relu(z)] = mu (1 - Phi(-mu/sigma)) + sigma phi(-mu/sigma)`.

A plain flax model (`haqjax.nn.quantized`) is corrected on its `nn.Conv`
and `nn.Dense` ops (`haqjax.ptq.wrapped.output_errors`), into the BNs of
its traced conv -> BN pairs (`pairs`).

The weight quantizer of each layer is its model's (`quant_scheme`, else
min-max per channel) and its bits are the policy's `w_bits`; activations are
not quantized while measuring. The correction goes into the layer's bias:
its BN's bias (`beta -= err * gamma / sqrt(var + eps)`, exact for folded and
unfolded BNs), else its own bias.

References:
  Nagel, van Baalen, Blankevoort, Welling. Data-Free Quantization Through
  Weight Equalization and Bias Correction. ICCV 2019.
  https://arxiv.org/abs/1906.04721
  Nagel et al. A White Paper on Neural Network Quantization. 2021.
  https://arxiv.org/abs/2106.08295
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from haqjax.nn.bn_folding import BN_EPSILON
from haqjax.nn.layers import DEFAULT_WEIGHT_QUANTIZER
from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.nn.layers import layer_name
from haqjax.nn.quantized import Quantized
from haqjax.policy import Policy
from haqjax.ptq.equalization import ACTIVATIONS
from haqjax.ptq.equalization import BNStats
from haqjax.ptq.equalization import EqualizationPair
from haqjax.ptq import wrapped
from haqjax.ptq.folding import BN_SUFFIX
from haqjax.ptq.folding import BNPair
from haqjax.ptq.folding import copy_tree
from haqjax.ptq.folding import get_path
from haqjax.typing import Array, ArrayLike, PyTree

MODES = ("output", "input")
RELU6_CLIP = 6.0


def clipped_normal_mean(mean: ArrayLike, std: ArrayLike, act: str) -> Array:
  """`E[act(z)]` for `z ~ N(mean, std^2)`, elementwise.

  For `clip(z, a, b)` with `alpha = (a - mu) / sigma`, `beta = (b - mu) /
  sigma`: `a Phi(alpha) + b (1 - Phi(beta)) + mu (Phi(beta) - Phi(alpha)) +
  sigma (phi(alpha) - phi(beta))`; ReLU is `a = 0, b = inf`, ReLU6 `b = 6`.

  Args:
    mean: `mu`, any shape.
    std: `sigma >= 0`, broadcastable to `mean` (0 gives `act(mu)`).
    act: 'relu', 'relu6' or 'linear'.

  Returns:
    The expected activation.

  Raises:
    ValueError: for another `act`.
  """
  if act not in ACTIVATIONS:
    raise ValueError(f"act is {act!r}; allowed: {', '.join(ACTIVATIONS)}")
  mu, sigma = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  if act == "linear":
    return mu
  safe = jnp.where(sigma > 0, sigma, 1.0)
  alpha = -mu / safe
  out = mu * (1 - norm.cdf(alpha)) + safe * norm.pdf(alpha)
  if act == "relu6":
    beta = (RELU6_CLIP - mu) / safe
    out = (RELU6_CLIP * (1 - norm.cdf(beta)) + mu * (norm.cdf(beta) - norm.cdf(alpha))
           + safe * (norm.pdf(alpha) - norm.pdf(beta)))
  point = jnp.maximum(mu, 0.0)
  point = jnp.minimum(point, RELU6_CLIP) if act == "relu6" else point
  return jnp.where(sigma > 0, out, point)


def _kernel_error_output(module: nn.Module, x: Array, dw: Array) -> Array:
  """The layer's output for kernel `dw` and no bias: `y_q - y` (linear in W)."""
  if isinstance(module, QDense):
    return jnp.dot(x, dw)
  strides = ((module.strides,) * 2 if isinstance(module.strides, int)
             else tuple(module.strides))
  padding = module.padding if isinstance(module.padding, str) else tuple(
      tuple(p) for p in module.padding)
  return jax.lax.conv_general_dilated(
      x, dw, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=module.feature_group_count)


def _measure(model: nn.Module, variables: PyTree, images: Array, weights: Array,
             policy: Policy) -> dict[str, tuple[Array, ...]]:
  """Per layer: the sum of `y_q - y` per output channel and its count, the
  sum of `x` per input channel and its count (weighted by example)."""
  found: dict[str, tuple[Array, ...]] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, (QConv, QDense)) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    x = args[0]
    y = next_fun(x, None)
    params = module.variables["params"]
    kernel = params["kernel"]
    name = layer_name(module)
    w_bits, _ = policy.bits_for(name)
    dw = module.quantizers()[0](params.get("weight_quant", {}), kernel, w_bits) - kernel
    err = _kernel_error_output(module, x.astype(jnp.float32), dw)
    w = weights.reshape((-1,) + (1,) * (y.ndim - 1))  # [N, 1, ..., 1]
    wx = weights.reshape((-1,) + (1,) * (x.ndim - 1))
    axes_y, axes_x = tuple(range(y.ndim - 1)), tuple(range(x.ndim - 1))
    found[name] = (
        jnp.sum(err * w, axis=axes_y), jnp.sum(jnp.broadcast_to(w, y.shape[:-1] + (1,))),
        jnp.sum(x * wx, axis=axes_x), jnp.sum(jnp.broadcast_to(wx, x.shape[:-1] + (1,))))
    return y

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  return found


def expected_output_error(model: nn.Module, variables: PyTree,
                          batches: Iterable[ArrayLike | Mapping[str, ArrayLike]],
                          policy: Policy, *, mode: str = "output"
                          ) -> dict[str, Array]:
  """`E[y_q - y]` per output channel of every layer, from calibration data.

  Each layer runs on its floating-point input (the float model's), once with
  its quantized kernel (`w_bits` of `policy`, activations in float) and once
  in float. The layer's own bias cancels.

  Args:
    model: the model (its quantizers are used).
    variables: the variables to correct (usually BN-folded).
    batches: image arrays, or dicts with "image" and optionally a boolean
      "mask" of the examples to count.
    policy: the bits.
    mode: 'output' (measured) or 'input' (`(W_q - W) E[x]`).

  Returns:
    `{layer name: [out_channels] error}` in call order.

  Raises:
    ValueError: a bad mode, or no batches.
  """
  if mode not in MODES:
    raise ValueError(f"mode is {mode!r}; allowed: {', '.join(MODES)}")
  op_errors = wrapped.output_errors if isinstance(model, Quantized) else _measure
  measure = jax.jit(lambda v, x, w: op_errors(model, v, x, w, policy))
  totals: dict[str, list] = {}
  for batch in batches:
    images = batch["image"] if isinstance(batch, Mapping) else batch
    mask = batch.get("mask") if isinstance(batch, Mapping) else None
    images = jnp.asarray(images)
    weights = (jnp.ones(images.shape[0]) if mask is None
               else jnp.asarray(mask, jnp.float32))
    for name, sums in measure(variables, images, weights).items():
      acc = totals.setdefault(name, [0.0, 0.0, 0.0, 0.0])
      for i, s in enumerate(sums):
        acc[i] = acc[i] + np.asarray(s, np.float64)
  if not totals:
    raise ValueError("calibration batches are empty; allowed: at least one batch")
  if mode == "output":
    return {n: jnp.asarray(e / c, jnp.float32) for n, (e, c, _, _) in totals.items()}
  quantized = {}
  for name, (_, _, xs, cx) in totals.items():
    quantized[name] = input_mean_error(model, variables, policy, name,
                                       jnp.asarray(xs / cx, jnp.float32))
  return quantized


def _weight_quantizer(model: nn.Module, name: str):
  scheme = getattr(model, "quant_scheme", None)
  return DEFAULT_WEIGHT_QUANTIZER if scheme is None else scheme.for_layer(name)[0]


def input_mean_error(model: nn.Module, variables: PyTree, policy: Policy,
                     name: str, x_mean: ArrayLike) -> Array:
  """`(W_q - W) E[x]` of layer `name` for a per-input-channel mean `x_mean`.

  Sums over the kernel's spatial taps (zero padding is ignored); a depthwise
  kernel `[kh, kw, 1, C]` pairs channel `c` with `x_mean[c]`.

  Returns:
    `[out_channels]` error.
  """
  layer = get_path(variables["params"], tuple(name.split("/")))
  kernel = jnp.asarray(layer["kernel"])
  wq = _weight_quantizer(model, name)
  w_bits, _ = policy.bits_for(name)
  dw = wq(layer.get("weight_quant", {}), kernel, w_bits) - kernel
  x_mean = jnp.asarray(x_mean, jnp.float32)
  if dw.ndim == 2:
    return x_mean @ dw
  if dw.shape[2] == x_mean.shape[0]:
    return jnp.einsum("hwio,i->o", dw, x_mean)
  return dw.sum(axis=(0, 1, 2)) * x_mean  # Depthwise.


def correct_bias(variables: PyTree, errors: Mapping[str, ArrayLike], *,
                 eps: float = BN_EPSILON, pairs: Iterable[BNPair] | None = None
                 ) -> PyTree:
  """Variables with each layer's expected output error taken off its bias.

  Args:
    variables: not modified.
    errors: `{layer name: [out_channels] E[y_q - y]}`.
    eps: the BN epsilon.
    pairs: the layer -> BN pairs (`haqjax.ptq.folding.traced_bn_pairs` of a
      plain flax model); None: a layer `X`'s BN is its sibling `X_bn`.

  Returns:
    New variables: the BN's bias `-= err * gamma / sqrt(var + eps)`, or
    `X`'s own bias `-= err` when it has no BN.

  Raises:
    ValueError: a layer with neither a BN nor a bias.
  """
  params = copy_tree(variables["params"])
  stats = variables.get("batch_stats", {})
  bn_paths = None if pairs is None else {p.name: p.bn_path for p in pairs}
  for name, err in errors.items():
    path = tuple(name.split("/"))
    parent = get_path(params, path[:-1])
    bn_path = (path[:-1] + (path[-1] + BN_SUFFIX,) if bn_paths is None
               else bn_paths.get(name))
    err = jnp.asarray(err, jnp.float32)
    if bn_path is not None and _has_path(params, bn_path):
      bn = get_path(params, bn_path)
      var = get_path(stats, bn_path)["var"]
      gain = bn.get("scale", 1.0) * jax.lax.rsqrt(jnp.asarray(var) + eps)
      bn["bias"] = bn["bias"] - err * gain
    elif "bias" in parent[path[-1]]:
      parent[path[-1]]["bias"] = parent[path[-1]]["bias"] - err
    else:
      raise ValueError(f"layer {name!r} has no BN or bias; allowed: layers with "
                       "an output bias")
  return {**variables, "params": params}


def _has_path(tree: PyTree, path: tuple[str, ...]) -> bool:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return False
    tree = tree[key]
  return True


def empirical_bias_correction(model: nn.Module, variables: PyTree,
                              batches: Iterable[ArrayLike | Mapping[str, ArrayLike]],
                              policy: Policy, *, mode: str = "output",
                              eps: float = BN_EPSILON,
                              pairs: Iterable[BNPair] | None = None) -> PyTree:
  """Bias correction of every layer from calibration data.

  Example::

      folded = fold_batch_norms(model, variables)
      corrected = empirical_bias_correction(model, folded, batches, policy)
      logits = model.apply(corrected, images, policy=policy)

  Args:
    model, variables, batches, policy, mode: as `expected_output_error`.
    eps: the BN epsilon.
    pairs: the layer -> BN pairs (`correct_bias`).

  Returns:
    New variables (`correct_bias`).

  Raises:
    ValueError: as `expected_output_error` and `correct_bias`.
  """
  errors = expected_output_error(model, variables, batches, policy, mode=mode)
  return correct_bias(variables, errors, eps=eps, pairs=pairs)


def analytic_bias_correction(model: nn.Module, variables: PyTree, policy: Policy,
                             pairs: Iterable[EqualizationPair], bn_stats: BNStats,
                             *, eps: float = BN_EPSILON,
                             bn_pairs: Iterable[BNPair] | None = None) -> PyTree:
  """Data-free bias correction of every `second` layer of `pairs`.

  Layers whose input is not one BN + activation (the stem, residual sums)
  are left as they are.

  Args:
    model: the model (its weight quantizers).
    variables: the variables to correct (usually folded and equalized).
    policy: the bits.
    pairs: `equalization_pairs(model)` (every pair, ReLU6 ones included).
    bn_stats: `{layer: (mean, std)}` of each `first`'s BN output, matching
      `variables` (`bn_output_stats` before folding, through equalization).
    eps: the BN epsilon.
    bn_pairs: the layer -> BN pairs (`correct_bias`'s `pairs`; a plain flax
      model's `traced_bn_pairs`, with `haqjax.ptq.wrapped.equalization_pairs`
      as `pairs`).

  Returns:
    New variables (`correct_bias`).

  Raises:
    ValueError: a first layer without statistics, or as `correct_bias`.
  """
  errors = {}
  for p in pairs:
    if p.first not in bn_stats:
      raise ValueError(f"bn_stats has no entry for layer {p.first!r}; allowed: "
                       "statistics of every first layer of a pair")
    mean, std = bn_stats[p.first]
    x_mean = clipped_normal_mean(mean, std, p.act)
    errors[p.second] = input_mean_error(model, variables, policy, p.second, x_mean)
  return correct_bias(variables, errors, eps=eps, pairs=bn_pairs)
