"""PTQ's per-layer passes on a plain flax model (`haqjax.nn.quantized`).

The PTQ flow (`haqjax.ptq.pipeline`) reads the layers of a haqjax-layer
model off its `QConv`/`QDense` modules. A model the user wrote with flax's
layers has intercepted ops instead (`haqjax.nn.intercept`), and this module
gives the passes what they need from those:

* `layer_geometries`: the linear map of each `nn.Conv` (2-D, NHWC, no
  dilation, padding 'SAME', 'VALID' or explicit) and `nn.Dense` op, which
  AdaRound reconstructs (`nnx.Conv` and `nnx.Linear` in an NNX model).
  Other ops (`nn.DenseGeneral`, `nn.Einsum`, a dilated or circular
  convolution, a matmul of two activations, which has no weights) keep
  nearest rounding on their calibrated grid.
* `output_errors`: per `nn.Conv`/`nn.Dense` op, the output shift its
  quantized kernel causes on its floating-point input, for empirical bias
  correction. The op's own computation (flax's, through the interception)
  runs on the kernel error, so strides, padding and groups are the layer's.
* `equalization_pairs`: the cross-layer equalization pairs
  (`haqjax.ptq.equalization`) found by data flow
  (`haqjax.nn.dataflow.layer_chains`): two layers joined only by the first's
  BN, ReLU or ReLU6 and per-channel pooling, which analytic bias correction
  takes too.

The BatchNorms that take those corrections and rescalings are the traced
conv -> BN pairs (`haqjax.ptq.folding.traced_bn_pairs`), not names.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import flax.linen as nn
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp
import numpy as np

from haqjax.nn.dataflow import layer_chains
from haqjax.nn.nnx_model import called_layer
from haqjax.nn.quantized import Quantized
from haqjax.nn.quantized import apply_float
from haqjax.nn.quantized import op_quantizers
from haqjax.policy import Policy
from haqjax.ptq.equalization import EqualizationPair
from haqjax.ptq.folding import BNPair
from haqjax.ptq.folding import get_path
from haqjax.ptq.layer_geometry import LayerGeometry
from haqjax.typing import Array, ArrayLike, PyTree


def geometry(module: nn.Module) -> LayerGeometry | None:
  """The `LayerGeometry` of an `nn.Conv` or `nn.Dense` (or the `nnx.Conv` or
  `nnx.Linear` an NNX model's scope runs); None for other modules."""
  module = called_layer(module)
  if isinstance(module, (nn.Dense, nnx.Linear)):
    return LayerGeometry(kind="dense")
  if (not isinstance(module, (nn.Conv, nnx.Conv))
      or len(np.atleast_1d(module.kernel_size)) != 2):
    return None  # An int kernel_size is a 1-D convolution.
  dilations = (module.input_dilation, module.kernel_dilation)
  if any(d not in (None, 1, (1, 1)) for d in dilations):
    return None
  padding = canonicalize_padding(module.padding, 2)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    return None  # 'CIRCULAR', 'CAUSAL': flax pads the input itself.
  return LayerGeometry(kind="conv", strides=module.strides or 1, padding=padding,
                       groups=module.feature_group_count)


def _sites(model: Quantized, variables: PyTree, images: Array, fn) -> dict[str, Any]:
  """`{op name: fn(site, lhs, rhs, compute)}` of every op with a geometry."""
  found: dict[str, Any] = {}

  def handle(site, lhs, rhs, compute):
    if site.kind != "matmul" and geometry(site.module) is not None:
      found[site.name] = fn(site, lhs, rhs, compute)
    return compute(lhs, rhs)

  apply_float(model, variables, handle, images, train=False)
  return found


def layer_geometries(model: Quantized, variables: PyTree, image: ArrayLike
                     ) -> dict[str, LayerGeometry]:
  """`{op name: LayerGeometry}` of the ops AdaRound can reconstruct, call order."""
  found = {}

  def run(v, x):
    found.update(_sites(model, v, x, lambda site, *_: geometry(site.module)))

  jax.eval_shape(run, variables, jnp.asarray(image)[:1])
  return found


def output_errors(model: Quantized, variables: PyTree, images: Array, weights: Array,
                  policy: Policy) -> dict[str, tuple[Array, ...]]:
  """Per `nn.Conv`/`nn.Dense` op: the sum of `y_q - y` per output channel and
  its count, the sum of `x` per input channel and its count (weighted by
  example), as `haqjax.ptq.bias_correction` measures a haqjax layer's."""
  def measure(site, x, kernel, compute):
    weight_q, _ = op_quantizers(model.quant_scheme, site.name, site.kind)
    scope = site.module.scope
    params = (scope.get_variable("params", "weight_quant")
              if scope.has_variable("params", "weight_quant") else {})
    w_bits, _ = policy.bits_for(site.name)
    err = compute(x, weight_q(params, kernel, w_bits) - kernel).astype(jnp.float32)
    x = x.astype(jnp.float32)
    w = weights.reshape((-1,) + (1,) * (err.ndim - 1))  # [N, 1, ..., 1]
    wx = weights.reshape((-1,) + (1,) * (x.ndim - 1))
    axes_y, axes_x = tuple(range(err.ndim - 1)), tuple(range(x.ndim - 1))
    return (jnp.sum(err * w, axis=axes_y),
            jnp.sum(jnp.broadcast_to(w, err.shape[:-1] + (1,))),
            jnp.sum(x * wx, axis=axes_x), jnp.sum(jnp.broadcast_to(wx, x.shape[:-1] + (1,))))

  return _sites(model, variables, images, measure)


def _takes(kernel: np.ndarray, channels: int) -> bool:
  """Whether `kernel` reads `channels` inputs as a dense, conv or depthwise."""
  shape = np.shape(kernel)
  return ((len(shape) == 2 and shape[0] == channels)
          or (len(shape) == 4 and (shape[2] == channels
                                   or (shape[2] == 1 and shape[3] == channels))))


def equalization_pairs(model: nn.Module, variables: PyTree, input_shape: tuple[int, ...],
                       bn_pairs: tuple[BNPair, ...]) -> tuple[EqualizationPair, ...]:
  """The CLE pairs of a plain flax model, by data flow.

  A traced `layer_chains` pair is kept when both layers have an output bias
  (their own, or their BN's in `bn_pairs`) and the second reads the first's
  channels as a dense, conv or depthwise kernel (a grouped conv does not).

  Args:
    model: a `haqjax.nn.quantized` (or NNX) model.
    variables: its variables (arrays or shapes).
    input_shape: the shape of its input.
    bn_pairs: its traced layer -> BN pairs (`traced_bn_pairs`).

  Returns:
    The pairs, in the order their second layers run.
  """
  with_bn = {p.name for p in bn_pairs}
  params = variables["params"]

  def biased(name):
    return name in with_bn or "bias" in get_path(params, tuple(name.split("/")))

  pairs = []
  for chain in layer_chains(model, variables, input_shape):
    first, second = "/".join(chain.first), "/".join(chain.second)
    channels = np.shape(get_path(params, chain.first)["kernel"])[-1]
    if (biased(first) and biased(second)
        and _takes(get_path(params, chain.second)["kernel"], channels)):
      pairs.append(EqualizationPair(first, second, chain.act))
  return tuple(pairs)
