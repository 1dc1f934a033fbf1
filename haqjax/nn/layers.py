"""Quantizable layers: convolution (incl. depthwise/grouped) and dense.

Each layer takes the policy at call time, `layer(x, policy)`, and looks up its
own bits by its module path. `policy=None` runs in floating point. A
`SoftPolicy` (a differentiable bit search's relaxed policy) quantizes each
tensor to the probability-weighted mixture of its candidate bit-widths and
runs one convolution on the mixtures (EdMIPS). The input
activation is quantized to `a_bits` and the kernel to `w_bits` before the
matmul/convolution, as in HAQ.

Quantizers are static: a layer's `weight_quantizer` / `act_quantizer` when
set, else the `quant_scheme` (a `haqjax.quant.QuantScheme`) of the nearest
enclosing module that has one (the model), else min-max STE fake-quant. So a
model takes any quantizer per role and per layer without changing its code.
Quantizers that round stochastically draw from the `quant` RNG stream.

The bare default for activations, `MinMaxActivation`, takes each batch's
range, so a layer's output depends on the other examples of its batch
(including padding rows). Jobs do not use it: the trainer's `build_model`
(`haqjax.train.trainer`) gives every quantized model the config's
`QuantScheme`, by default 'static' activation ranges (`StaticRange`)
calibrated on a few training batches and then fixed, as a deployed integer
model holds them.
Direct users who choose `StaticRange` must calibrate it
(`haqjax.nn.calibrate.calibrate`) before use: until then its range is 0.

A `QConv` called with `bn=` (a `FoldedBatchNorm`, the variables of the
BatchNorm that follows it) quantizes the BN-folded kernel
`W * gamma / sqrt(var + eps)`, as an integer deployment stores it, and
returns the BN's output: simulated BN folding for QAT (Jacob et al. 2018,
section 3.2), with Krishnamoorthi's (2018, section 3.2.2) batch-statistics
correction in training. `haqjax.models.conv_bn` does this for models with
`fold_bn=True`.

Shapes: convolution kernels are `[kh, kw, in/groups, out]`, dense kernels
`[in, out]`, activations NHWC.

A `QConv` picks its convolution by the backend at trace time: on CPU, where
XLA's grouped and 1x1 convolution gradients are slow, a depthwise layer runs
as shifted multiply-adds (`haqjax.nn.depthwise`) and a 1x1 layer as a matrix
product (`haqjax.nn.pointwise`); every other case, and every layer on GPU
and TPU, runs `haqjax.nn.batching.conv` (XLA's convolution, kept dense under
a sweep's `vmap`). They agree to float32 summation order.

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference. CVPR 2018.
  https://arxiv.org/abs/1712.05877
  Krishnamoorthi. Quantizing deep convolutional networks for efficient
  inference: A whitepaper. 2018. https://arxiv.org/abs/1806.08342
  Cai & Vasconcelos. Rethinking Differentiable Search for Mixed-Precision
  Neural Networks. CVPR 2020. https://arxiv.org/abs/2004.05795
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from haqjax.nn import batching
from haqjax.nn import depthwise
from haqjax.nn import pointwise
from haqjax.nn.bn_folding import folded_kernel_and_bias
from haqjax.policy import Policy
from haqjax.policy import SoftPolicy
from haqjax.quant.base import Quantizer
from haqjax.quant.uniform import MinMaxActivation
from haqjax.quant.uniform import MinMaxWeight
from haqjax.typing import Array
from haqjax.typing import PyTree

Initializer = Callable[..., Array]
DEFAULT_WEIGHT_QUANTIZER = MinMaxWeight()
DEFAULT_ACT_QUANTIZER = MinMaxActivation()


def layer_name(module: nn.Module) -> str:
  """The name a layer has in the layer table and the policy: its module path."""
  return "/".join(module.scope.path)


def inherited(module: nn.Module, field: str) -> Any:
  """`field` of the nearest enclosing module that sets it (not None), else None.

  How model-wide options (`quant_scheme`, `fold_bn`, `freeze_bn_stats`) reach
  layers without being passed through every block.
  """
  parent = module.parent
  while isinstance(parent, nn.Module):
    value = getattr(parent, field, None)
    if value is not None:
      return value
    parent = parent.parent
  return None


def _scheme(module: nn.Module):
  """The `quant_scheme` of the nearest enclosing module that sets one."""
  return inherited(module, "quant_scheme")


class QuantizedLayer(nn.Module):
  """Base of the haqjax layers: quantization of (input, kernel) by the policy.

  Subclasses (`QConv`, `QDense`) declare `weight_quantizer` and
  `act_quantizer`; calibration (`haqjax.nn.calibrate`) finds the quantizable
  layers of a model as instances of this class.
  """

  def quantizers(self) -> tuple[Quantizer, Quantizer]:
    """This layer's `(weight_quantizer, act_quantizer)`."""
    wq, aq = self.weight_quantizer, self.act_quantizer
    if wq is None or aq is None:
      scheme = _scheme(self)
      if scheme is not None:
        swq, saq = scheme.for_layer(layer_name(self))
        wq = swq if wq is None else wq
        aq = saq if aq is None else aq
    return (DEFAULT_WEIGHT_QUANTIZER if wq is None else wq,
            DEFAULT_ACT_QUANTIZER if aq is None else aq)

  def _quantizer_params(self, name: str, quantizer: Quantizer, x: Array) -> PyTree:
    """The parameter `name` of `quantizer` (for `x`); created at init when not empty.

    Once the parameter exists, `quantizer.init` is not traced: its range
    computation is dead code, but differentiating the model (a training
    step, a Hessian-vector product) traced and compiled its JVP in every
    layer.
    """
    if self.has_variable("params", name):
      return self.get_variable("params", name)
    params = quantizer.init(x)
    return self.param(name, lambda _: params) if params else params

  def _quantize(self, x: Array, kernel: Array,
                policy: Policy | SoftPolicy | None) -> tuple[Array, Array]:
    wq, aq = self.quantizers()
    w_params = self._quantizer_params("weight_quant", wq, kernel)
    a_params = self._quantizer_params("act_quant", aq, x)
    if policy is None:
      return x, kernel
    a_key = self.make_rng("quant") if aq.needs_key else None
    w_key = self.make_rng("quant") if wq.needs_key else None
    if isinstance(policy, SoftPolicy):
      w_bits, w_probs, a_bits, a_probs = policy.candidates_for(layer_name(self))
      return (mix(aq, a_params, x, a_bits, a_probs, a_key, policy.per_candidate),
              mix(wq, w_params, kernel, w_bits, w_probs, w_key, policy.per_candidate))
    w_bits, a_bits = policy.bits_for(layer_name(self))
    return aq(a_params, x, a_bits, a_key), wq(w_params, kernel, w_bits, w_key)


@functools.partial(jax.jit, static_argnums=0)
def _quantize_candidate(quantizer: Quantizer, params: Any, x: Array, bits: Array,
                        key: Array | None) -> Array:
  return quantizer(params, x, bits, key)


def mix(quantizer: Quantizer, params: Any, x: Array, bits: Array, probs: Array,
        key: Array | None, per_candidate: bool = False) -> Array:
  """`sum_k probs[k] * Q(x, bits[k])`: EdMIPS's composite tensor, shape of `x`.

  With `per_candidate`, every leaf of `params` has a leading `[K]` axis and
  candidate `k` is quantized with `params[k]` (a quantizer per bit-width, as
  `SoftPolicy.per_candidate` describes); otherwise all share `params`.

  The K fake-quantized copies are elementwise work; the layer then runs one
  convolution on the mixture instead of one per candidate (Cai & Vasconcelos
  2020, sec. 3.3). Stochastic rounding draws an independent key per candidate.

  The sum is written out over the K candidates (K is static: the candidate
  list's length) so that XLA fuses the K quantizations and the weighted sum,
  forward and backward, into single elementwise passes. A `vmap` over the
  candidates followed by a `tensordot` materialises the `[K, *x.shape]`
  stack instead, and made a quickstart search step (K = 6) 1.6x slower on
  CPU. Each candidate's quantization is an inner `jit` (inlined by XLA), so
  Python traces the quantizer once per tensor shape, not K times.
  """
  k = bits.shape[0]
  keys = [None] * k if key is None else list(jax.random.split(key, k))
  try:
    hash(quantizer)
    quantize = _quantize_candidate
  except TypeError:  # A quantizer holding arrays: trace it per candidate.
    quantize = lambda q, *args: q(*args)
  if per_candidate:
    candidate_params = [jax.tree.map(lambda p, i=i: p[i], params) for i in range(k)]
  else:
    candidate_params = [params] * k
  probs = probs.astype(x.dtype)
  mixed = probs[0] * quantize(quantizer, candidate_params[0], x, bits[0], keys[0])
  for i in range(1, k):
    mixed = mixed + probs[i] * quantize(quantizer, candidate_params[i], x, bits[i], keys[i])
  return mixed


class FoldedBatchNorm(nn.Module):
  """The variables of a BatchNorm that the preceding `QConv` folds in.

  Holds what `nn.BatchNorm` holds, under the same names, shapes, dtypes and
  initial values (params `scale`, `bias`; batch_stats `mean`, `var`), so
  checkpoints move freely between a model with folded and one with plain
  BatchNorms. The `QConv` it is passed to reads and updates it.

  Attributes:
    features: channels.
    momentum: decay of the running averages, as `nn.BatchNorm`'s.
    epsilon: added to the variance, as `nn.BatchNorm`'s.
  """
  features: int
  momentum: float = 0.99
  epsilon: float = 1e-5

  def setup(self):
    shape = (self.features,)
    self.scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
    self.bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
    self.mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
    self.var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)

  def params_and_stats(self) -> tuple[dict[str, Array], dict[str, Array]]:
    """`({"scale", "bias"}, {"mean", "var"})`, the running statistics, `[C]` each."""
    return ({"scale": self.scale, "bias": self.bias},
            {"mean": self.mean.value, "var": self.var.value})

  def update(self, mean: Array, var: Array) -> None:
    """Moves the running averages towards batch statistics, as `nn.BatchNorm`."""
    if not self.is_initializing():
      m = self.momentum
      self.mean.value = m * self.mean.value + (1 - m) * mean
      self.var.value = m * self.var.value + (1 - m) * var


def _batch_moments(z: Array) -> tuple[Array, Array]:
  """Per-channel mean and (biased) variance of NHWC `z`, as `nn.BatchNorm`.

  In at least float32, with the variance as `E[z^2] - E[z]^2` clipped at 0
  (flax's `use_fast_variance`), so running statistics update exactly as in
  the unfolded model.
  """
  z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
  axes = tuple(range(z.ndim - 1))
  mean = jnp.mean(z, axis=axes)
  return mean, jnp.maximum(0.0, jnp.mean(jnp.square(z), axis=axes) - jnp.square(mean))


class QConv(QuantizedLayer):
  """2-D convolution with per-call weight/activation bits.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: stride, an int or (sh, sw).
    padding: 'SAME', 'VALID' or explicit ((top, bottom), (left, right)).
    feature_group_count: groups; equal to the input channels for depthwise.
    use_bias: add a bias after the convolution.
    weight_quantizer, act_quantizer: the quantizers for each role (None: the
      enclosing model's `quant_scheme`, else min-max).
    dtype: computation dtype (e.g. bfloat16 on TPU); parameters stay float32.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] = "SAME"
  feature_group_count: int = 1
  use_bias: bool = False
  kernel_init: Initializer = nn.initializers.variance_scaling(
      2.0, "fan_out", "normal")
  bias_init: Initializer = nn.initializers.zeros
  weight_quantizer: Quantizer | None = None
  act_quantizer: Quantizer | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, policy: Policy | SoftPolicy | None = None,
               bn: FoldedBatchNorm | None = None, train: bool = False) -> Array:
    """The convolution of `x`, or with `bn` its BN-folded form.

    With `bn`, the kernel that is quantized is the folded
    `W * gamma / sqrt(var + eps)` with the running statistics (what
    `haqjax.ptq.folding.fold_batch_norms` stores), and the output is the
    BN's. In eval (`train=False`) that is `conv(x, Q(W_fold)) + b_fold`,
    exactly the deployed integer layer. In training the BN normalises with
    the batch statistics: a float pass `z = conv(x, W)` gives `mu_B` and
    `sigma_B` (and updates the running averages), and the quantized output
    is corrected to them, `conv(x, Q(W_fold)) * sigma / sigma_B +
    beta - gamma * mu_B / sigma_B` (Krishnamoorthi 2018, section 3.2.2).
    Gradients flow through the batch statistics as in BatchNorm, so without
    quantization this is BatchNorm training exactly. This form rather than
    Jacob et al.'s (fold with the batch statistics) because the quantized
    weights are then the deployed ones, not ones that jitter with each
    batch's statistics, and eval uses the statistics training saw.

    Args:
      x: NHWC input.
      policy: the bit policy, or None for floating point.
      bn: the following BatchNorm's variables, to fold in; None: no BN.
      train: with `bn`: normalise with batch statistics and update the
        running ones (False: fold with the running statistics only).

    Returns:
      The NHWC output.
    """
    in_ch = x.shape[-1]
    groups = self.feature_group_count
    if in_ch % groups or self.features % groups:
      raise ValueError(f"{layer_name(self)}: channels in={in_ch} out={self.features} "
                       f"are not divisible by groups={groups}")
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, in_ch // groups,
                                                     self.features))
    if bn is not None:
      return self._folded(x, kernel, policy, bn, train)
    x, kernel = self._quantize(x, kernel, policy)
    y = self._conv(x, kernel, quantized=policy is not None)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
    return y

  def _conv(self, x: Array, kernel: Array, quantized: bool = False) -> Array:
    """`x` convolved with `kernel` by the fastest form here (see the module docstring).

    `quantized`: `x` is a fake-quantized input, which the CPU depthwise
    form writes to memory once rather than recompute per tap
    (`haqjax.nn.depthwise.by_batch_chunks`).
    """
    strides = ((self.strides,) * 2 if isinstance(self.strides, int)
               else tuple(self.strides))
    padding = self.padding if isinstance(self.padding, str) else tuple(
        tuple(p) for p in self.padding)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if depthwise.uses_taps(x.shape, kernel.shape, self.feature_group_count):
      return depthwise.depthwise_conv(x, kernel, window_strides=strides, padding=padding,
                                      materialize=quantized)
    if pointwise.uses_matmul(kernel.shape, self.feature_group_count, padding):
      return pointwise.pointwise_conv(x, kernel, window_strides=strides)
    return batching.conv(x, kernel, window_strides=strides, padding=padding,
                         feature_group_count=self.feature_group_count)

  def _folded(self, x: Array, kernel: Array, policy: Policy | SoftPolicy | None,
              bn: FoldedBatchNorm, train: bool) -> Array:
    bias = (self.param("bias", self.bias_init, (self.features,))
            if self.use_bias else None)
    bn_params, running = bn.params_and_stats()  # [out] each
    eps = bn.epsilon
    w_fold, b_fold = folded_kernel_and_bias(kernel, bn_params, running, eps, bias)
    x, w_q = self._quantize(x, w_fold, policy)
    y = self._conv(x, w_q, quantized=policy is not None)
    if not train:
      return y + b_fold.astype(self.dtype)
    # The float pass that gives the batch statistics.
    z = self._conv(x, kernel, quantized=policy is not None)
    if bias is not None:
      z = z + bias.astype(self.dtype)
    mean, var = _batch_moments(z)  # [out] each
    bn.update(mean, var)
    _, b_batch = folded_kernel_and_bias(kernel, bn_params, {"mean": mean, "var": var},
                                        eps, bias)
    correction = jnp.sqrt(running["var"] + eps) * jax.lax.rsqrt(var + eps)  # sigma / sigma_B
    return y * correction.astype(self.dtype) + b_batch.astype(self.dtype)


class QDense(QuantizedLayer):
  """Dense layer over the last axis with per-call weight/activation bits."""
  features: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  weight_quantizer: Quantizer | None = None
  act_quantizer: Quantizer | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, policy: Policy | SoftPolicy | None = None) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    x, kernel = self._quantize(x, kernel, policy)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
    return y
