"""BatchNorm folding maths: a layer's kernel and bias with its BN merged in.

At inference a BatchNorm after a convolution is an affine map per output
channel, `y = gamma * (z - mean) / sqrt(var + eps) + beta`, so it merges into
the convolution: the kernel's output channel `o` is multiplied by
`gamma_o / sqrt(var_o + eps)` and the bias becomes
`beta_o - mean_o * gamma_o / sqrt(var_o + eps)` (Nagel et al. 2021, section
3.2; Jacob et al. 2018).

These are the pure array functions under both uses of folding: a `QConv`
with a folded BN (`haqjax.nn.layers`) folds on every call, on the live
parameters and the running or batch statistics, so the quantizer acts on the
folded kernel while the gradient still reaches `gamma` and `beta`
(Krishnamoorthi 2018, section 3.2); `haqjax.ptq.folding` folds the variables
of a trained model once, in float64 numpy.

References:
  Nagel, Fournarakis, Amjad, Bondarenko, van Baalen, Blankevoort. A White
  Paper on Neural Network Quantization. 2021. https://arxiv.org/abs/2106.08295
  Jacob et al. Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference. CVPR 2018.
  https://arxiv.org/abs/1712.05877
  Krishnamoorthi. Quantizing deep convolutional networks for efficient
  inference: A whitepaper. 2018. https://arxiv.org/abs/1806.08342
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from haqjax.typing import Array, ArrayLike

# The epsilon of every BatchNorm in the model zoo (as flax's and PyTorch's
# default), which folding divides by `sqrt(var + eps)` with.
BN_EPSILON = 1e-5


def check_eps(eps: float) -> None:
  """Raises a ValueError unless `eps` is a BN epsilon, a number in (0, 1)."""
  if not (isinstance(eps, (int, float)) and 0 < eps < 1):
    raise ValueError(f"eps is {eps!r}; allowed: a number in (0, 1)")


def folded_kernel_and_bias(kernel: ArrayLike, bn_params: Mapping[str, ArrayLike],
                           bn_stats: Mapping[str, ArrayLike],
                           eps: float = BN_EPSILON,
                           bias: ArrayLike | None = None, *,
                           xp: Any = jnp) -> tuple[Array, Array]:
  """The kernel and bias of a layer with its following BatchNorm merged in.

  Pure and differentiable, so a QAT step can fold on every call::

      w, b = folded_kernel_and_bias(p["conv1"]["kernel"], p["conv1_bn"],
                                    stats["conv1_bn"])
      y = conv(x, quantize(w)) + b

  Args:
    kernel: `[..., out]` kernel (conv `[kh, kw, in/groups, out]`, dense
      `[in, out]`).
    bn_params: the BN's parameters, `{"scale": [out], "bias": [out]}`
      (either may be missing: scale 1, bias 0).
    bn_stats: `{"mean": [out], "var": [out]}` (running or batch statistics).
    eps: the BN's epsilon.
    bias: the layer's own bias `[out]`, if it has one.
    xp: the array module that computes: `jax.numpy` (traceable and
      differentiable), or `numpy` (e.g. on float64 arrays, without a
      compilation per shape).

  Returns:
    `(kernel * gamma / sqrt(var + eps), beta + (bias - mean) * gamma /
    sqrt(var + eps))`, the kernel shaped as `kernel`.

  Raises:
    ValueError: a bad `eps`, or a BN array without one entry per output
      channel.
  """
  check_eps(eps)
  kernel = xp.asarray(kernel)
  out = kernel.shape[-1]
  mean, var = xp.asarray(bn_stats["mean"]), xp.asarray(bn_stats["var"])
  gamma = xp.asarray(bn_params.get("scale", xp.ones(out, kernel.dtype)))
  beta = xp.asarray(bn_params.get("bias", xp.zeros(out, kernel.dtype)))
  for field, v in (("mean", mean), ("var", var), ("scale", gamma), ("bias", beta)):
    if v.shape != (out,):
      raise ValueError(f"BN {field} has shape {v.shape}; allowed: ({out},), one "
                       "entry per output channel of the kernel")
  mul = gamma / xp.sqrt(var + eps)  # [out]
  b = -mean if bias is None else xp.asarray(bias) - mean
  return kernel * mul, beta + b * mul
