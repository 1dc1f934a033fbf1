"""AdaRound: learned up-or-down rounding of weights, one layer at a time.

Rounding each weight to the nearest grid point minimises the weight error, not
the error of the layer's output. AdaRound (Nagel et al. 2020) learns, per
weight, whether to round down or up so that the quantized layer reproduces the
floating-point layer's output on calibration data::

    W_soft = s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z)
    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)   # zeta=1.1, gamma=-0.1
    loss = ||f(W x_t + b) - f(W_soft x + b)||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)

The final weights are `s * (clip(floor(W / s) + [h(V) >= 0.5] + z, qmin,
qmax) - z)`: exactly on the grid. The parts live in their own modules:

* `haqjax.ptq.soft_rounding`: `h(V)`, its initialisation, the regulariser and
  the annealing of `beta`;
* `haqjax.ptq.reconstruction`: the loss, exact from second moments of the
  inputs ('moments') or sampled ('minibatch');
* `haqjax.ptq.layer_geometry`: the layer's linear map (`LayerGeometry`);
* `haqjax.ptq.layer_rounding`: the optimisation of one layer;

and this module rounds a whole model, layer after layer (`adaround_model`).
`adaround_layer`, `AdaRoundInfo`, `DEFAULT_ITERS`, `LayerGeometry` and
`layer_geometries` are re-exported here, so that one import serves both.

Using the result: the rounded kernels are already on the grid of the returned
range. Quantizing them again with `StaticRange(spec=spec, sign="signed")`
holding `ranges[name]` as its `{"lo", "hi"}` parameters gives them back
exactly (same scale, same codes). `MinMaxWeight` recomputes the scale from the
rounded kernel's own maximum: with `minmax` ranges that kept every code of
the quickstart CNN at W3 and W4 (values differ by float rounding only), but it is not
guaranteed (rounding may move a channel's largest weight), and after an `mse`
range, which clips, it shifts the grid (W4 top-1 92.1% with the fixed
ranges, 91.6% re-quantized by `MinMaxWeight`): use the returned ranges.

Example:
  >>> import jax
  >>> from haqjax.ptq import adaround
  >>> k1, k2 = jax.random.split(jax.random.key(0))
  >>> w = jax.random.normal(k1, (16, 8))
  >>> x = jax.nn.relu(jax.random.normal(k2, (256, 16)))
  >>> w_q, info = adaround.adaround_layer(jax.random.key(1), w, x, 3, iters=500)
  >>> bool(info.recon_adaround < info.recon_nearest)
  True

References:
  Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
  Quantization", ICML 2020.
  Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by
  Block Reconstruction", ICLR 2021 (reference implementation of AdaRound).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from haqjax.nn.calibrate import record_layer_inputs
from haqjax.nn.quantized import Quantized
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy
from haqjax.ptq import wrapped
from haqjax.ptq.layer_geometry import LayerGeometry  # noqa: F401  (re-exported)
from haqjax.ptq.layer_geometry import layer_geometries
from haqjax.ptq.layer_rounding import DEFAULT_ITERS  # noqa: F401  (re-exported)
from haqjax.ptq.layer_rounding import AdaRoundInfo
from haqjax.ptq.layer_rounding import adaround_layer
from haqjax.treeutil import copy_tree
from haqjax.treeutil import get_path
from haqjax.typing import Array, PRNGKey, PyTree


class AdaRoundResult(NamedTuple):
  """What `adaround_model` returns.

  Attributes:
    variables: the model variables with every AdaRounded layer's kernel
      replaced by its rounded kernel.
    ranges: `{layer name: {"lo": ..., "hi": ...}}` for each rounded layer,
      the `StaticRange` parameters that re-quantize its kernel exactly.
    infos: `{layer name: AdaRoundInfo}`.
    seconds: `{layer name: wall seconds of its optimisation}` (compilation
      included for the first layer of each shape).
  """
  variables: PyTree
  ranges: dict[str, dict[str, Array]]
  infos: dict[str, AdaRoundInfo]
  seconds: dict[str, float]


def adaround_model(key: PRNGKey, model: nn.Module, variables: PyTree,
                   batches: Iterable[Any], policy: Policy, *,
                   sequential: bool = False, **options: Any) -> AdaRoundResult:
  """AdaRounds every quantized layer's kernel, in forward order.

  Layers with `w_bits` of `FLOAT_BITS` (floating point) or 1 (binary, which
  has no rounding choice on the affine grid) are left unchanged and get no
  range. Activations stay in floating point here; the activation
  quantizers are calibrated separately.

  To evaluate or export the result, give each rounded layer the weight
  quantizer `StaticRange(spec=spec, sign="signed")` with parameters
  `ranges[name]` (`params[...]["weight_quant"]`); it re-quantizes the
  rounded kernel to itself at the layer's bits. With every weight bit-width
  at `FLOAT_BITS` the model runs the rounded kernels as they are.

  On the quickstart CNN (W4A32, 1,024 images, 2-core CPU) the whole call
  takes 11-21 s with the defaults; `sequential=True` took 19 s for the same
  top-1 (92.0%).

  Args:
    key: PRNG key; each layer gets its own split.
    model: the model (built from QConv/QDense, or a plain flax model
      wrapped by `haqjax.nn.quantized`: its `nn.Conv` and `nn.Dense` ops
      are rounded, `haqjax.ptq.wrapped.layer_geometries`).
    variables: `{"params": ..., "batch_stats": ...}` with trained weights.
    batches: calibration batches (dicts with "image" and optionally "mask",
      or image arrays); read once.
    policy: weight bits per layer.
    sequential: when true, each layer's input `x` comes from the model with
      the preceding layers already rounded (one extra floating-point pass
      over the calibration data per layer), and its target from the
      floating-point model (the paper's asymmetric reconstruction); when
      false, both are the floating-point input.
    **options: keyword options of `adaround_layer` (`spec`, `range_method`,
      `iters`, `batch_size`, `lr`, `reg_weight`, `beta`, `warmup`,
      `objective`).

  Returns:
    An `AdaRoundResult`: new variables, the per-layer ranges to hold the
    weight grid fixed (`StaticRange` parameters), and per-layer infos.

  Raises:
    ValueError: no batches, a layer missing from the policy, or a bad option.

  References:
    Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
    Quantization", ICML 2020.
  """
  for name in ("layer", "target_inputs", "bias", "act_fn"):
    if name in options:
      raise ValueError(f"option {name!r} is set per layer by adaround_model; "
                       "allowed: options of adaround_layer other than it")
  images = []
  for batch in batches:
    x = batch["image"] if isinstance(batch, dict) else batch
    if isinstance(batch, dict) and batch.get("mask") is not None:
      x = np.asarray(x)[np.asarray(batch["mask"], bool)]
    images.append(np.asarray(x))
  if not images:
    raise ValueError("calibration batches are empty; allowed: at least one batch")
  recorded = record_layer_inputs(model, variables, images)
  geometries = (wrapped.layer_geometries if isinstance(model, Quantized)
                else layer_geometries)(model, variables, images[0])
  params = copy_tree(variables["params"])
  new_vars = {**variables, "params": params}
  ranges: dict[str, dict[str, Array]] = {}
  infos: dict[str, AdaRoundInfo] = {}
  seconds: dict[str, float] = {}
  names = list(recorded)
  keys = jax.random.split(key, len(names))
  for i, name in enumerate(names):
    w_bits = int(np.asarray(policy.bits_for(name)[0]))
    if w_bits >= FLOAT_BITS or w_bits <= 1 or name not in geometries:
      continue  # A wrapped model's op without a geometry keeps nearest rounding.
    entry = recorded[name]
    layer_params = get_path(params, entry["path"])
    inputs = entry["inputs"]
    if sequential and ranges:  # inputs through the already-rounded layers
      inputs = record_layer_inputs(model, new_vars, images, only=name)[name]["inputs"]
    t0 = time.perf_counter()
    rounded, info = adaround_layer(
        keys[i], layer_params["kernel"], inputs, w_bits, layer=geometries[name],
        target_inputs=entry["inputs"] if sequential else None, **options)
    jax.block_until_ready(rounded)
    seconds[name] = round(time.perf_counter() - t0, 3)
    layer_params["kernel"] = rounded
    ranges[name] = {"lo": info.lo, "hi": info.hi}
    infos[name] = info
  return AdaRoundResult(variables=new_vars, ranges=ranges, infos=infos, seconds=seconds)
