"""Cross-layer equalization and high-bias absorption (DFQ, Nagel et al. 2019).

For a pair `first -> act -> second` where `act` is positively homogeneous
(`act(z / s) = act(z) / s` for `s > 0`: ReLU, the identity, and per-channel
linear maps such as global average pooling), dividing output channel `i` of
`first` (kernel and bias) by `s_i` and multiplying input channel `i` of
`second` by `s_i` leaves the network's function unchanged. DFQ chooses

    s_i = sqrt(r1_i * r2_i) / r2_i

with `r1_i = max |W1[..., i]|` (output channel `i` of `first`) and
`r2_i = max |W2|` over input channel `i` of `second` (for a depthwise
`second`, its channel `i`), so both ranges become `sqrt(r1_i * r2_i)` and
per-channel weight ranges even out: a per-tensor weight grid then wastes far
fewer levels (DFQ section 4.1). Pairs sharing a layer (MobileNetV2's
expand -> depthwise -> project) are swept repeatedly until no scale moves by
more than `tol` (a few passes).

ReLU6 is not positively homogeneous: with scaled channels, channel `i` clips
at `6 * s_i` in the original units instead of 6. DFQ replaces ReLU6 by ReLU
in MobileNetV2 before equalizing. haqjax models keep their ReLU6, so
`relu6` chooses:

* 'skip' (default): ReLU6 pairs are left alone; the float function is
  unchanged (for MobileNetV2 every pair is a ReLU6 pair, so nothing changes).
* 'relu': equalize them as if the activation were ReLU (DFQ); the float
  output changes wherever a pre-activation exceeds `6 * min(s_i, 1)` (run
  the model with ReLU instead of ReLU6 and it is unchanged).

High-bias absorption (DFQ section 4.2): when channel `i` of `first`'s BN
output `N(beta_i, gamma_i^2)` is almost always above
`c_i = max(0, beta_i - 3 gamma_i)`, then `relu(z - c) + c = relu(z)` for
those inputs, so `c` moves out of `first`'s bias into `second`'s bias
through `second`'s weights (`b2 += W2 c`), shrinking the activation range
that the next quantizer sees. It needs the BN statistics from before folding
(`haqjax.ptq.folding.bn_output_stats`), which equalization rescales along.

All functions take BN-folded variables (`fold_batch_norms`): a layer's bias is
its identity BN's bias, or a dense layer's own bias. A zoo model's pairs and
BNs are known by name (`equalization_pairs`, `X` and `X_bn`); a plain flax
model's come from its traced computation
(`haqjax.ptq.wrapped.equalization_pairs`, and `bn_pairs=` from
`haqjax.ptq.folding.traced_bn_pairs`).

References:
  Nagel, van Baalen, Blankevoort, Welling. Data-Free Quantization Through
  Weight Equalization and Bias Correction. ICCV 2019.
  https://arxiv.org/abs/1906.04721
  Nagel et al. A White Paper on Neural Network Quantization. 2021, section
  4.3. https://arxiv.org/abs/2106.08295
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from haqjax import models
from haqjax.nn.bn_folding import BN_EPSILON
from haqjax.ptq.folding import BN_SUFFIX
from haqjax.ptq.folding import BNPair
from haqjax.ptq.folding import copy_tree
from haqjax.ptq.folding import get_path
from haqjax.ptq.folding import is_folded
from haqjax.typing import Array, PyTree

ACTIVATIONS = ("relu", "relu6", "linear")
RELU6_MODES = ("skip", "relu")

BNStats = dict[str, tuple[Array, Array]]


class EqualizationPair(NamedTuple):
  """Two consecutive layers and the activation between them.

  Attributes:
    first: the layer whose output channels are scaled down.
    second: the layer that consumes `first`'s output alone (no residual add
      in between) and whose input channels are scaled up.
    act: 'relu', 'relu6' or 'linear', after `first`'s BN.
  """
  first: str
  second: str
  act: str


class Equalized(NamedTuple):
  """The result of `cross_layer_equalization` / `absorb_high_bias`.

  Attributes:
    variables: the new variables.
    bn_stats: the given BN output statistics, rescaled and shifted as the
      layers were (None when none were given).
    passes: sweeps over the pairs that were run.
  """
  variables: PyTree
  bn_stats: BNStats | None
  passes: int


def _check(field: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{field} is {value!r}; allowed: {', '.join(allowed)}")


def _chain(names: list[str], act: str) -> list[EqualizationPair]:
  return [EqualizationPair(a, b, act) for a, b in zip(names, names[1:])]


def equalization_pairs(model: nn.Module | str) -> tuple[EqualizationPair, ...]:
  """The CLE pairs of a zoo model: layers joined by one activation only.

  * digits_cnn, quickstart_cnn: the conv chain, and the last conv to the
    classifier through global average pooling (linear per channel); ReLU.
  * mobilenet_v1: stem -> block1/depthwise, depthwise -> pointwise in each
    block, pointwise -> the next block's depthwise, block13/pointwise ->
    classifier; ReLU.
  * mobilenet_v2 (and _small): stem -> block1/depthwise, expand ->
    depthwise -> project in each block (block1 has no expand), head ->
    classifier; ReLU6. Nothing crosses a residual add or the linear
    project -> next block boundary.
  * ResNets: conv1 -> conv2 (-> conv3 for bottlenecks) inside each block;
    ReLU.

  Args:
    model: a zoo model, or its name in `haqjax.models.MODELS` (ResNets by
      name take the factory's default depth).

  Returns:
    The pairs in forward order.

  Raises:
    ValueError: for an unknown model or model class.
  """
  if isinstance(model, str):
    model = models.create(model, num_classes=10)
  if isinstance(model, models.DigitsCNN):
    return tuple(_chain(["stem", "conv1", "classifier"], "relu"))
  if isinstance(model, models.QuickstartCNN):
    names = [n for n, *_ in models.cnn.QUICKSTART_LAYERS] + ["classifier"]
    return tuple(_chain(names, "relu"))
  if isinstance(model, models.MobileNetV1):
    names = ["stem"] + [f"block{i}/{k}" for i in range(1, 14)
                        for k in ("depthwise", "pointwise")] + ["classifier"]
    return tuple(_chain(names, "relu"))
  if isinstance(model, models.MobileNetV2):
    pairs = [EqualizationPair("stem", "block1/depthwise", "relu6")]
    i = 1
    for t, _, n, _ in models.mobilenet.V2_STAGES:
      for _ in range(n):
        block = ["expand"] if t != 1 else []
        block = [f"block{i}/{k}" for k in block + ["depthwise", "project"]]
        pairs += _chain(block, "relu6")
        i += 1
    pairs.append(EqualizationPair("head", "classifier", "relu6"))
    return tuple(pairs)
  if isinstance(model, (models.ResNet, models.CifarResNet)):
    convs = ("conv1", "conv2", "conv3") if getattr(
        model, "block", "basic") == "bottleneck" else ("conv1", "conv2")
    pairs = []
    for s, n in enumerate(model.stage_sizes, start=1):
      for b in range(n):
        pairs += _chain([f"layer{s}_{b}/{c}" for c in convs], "relu")
    return tuple(pairs)
  raise ValueError(f"model is {type(model).__name__}; allowed: a zoo model "
                   f"({', '.join(models.MODELS)}) or its name")


class _Layer:
  """float64 working copies of a layer's kernel and output bias."""

  def __init__(self, params: PyTree, stats: PyTree, name: str, eps: float,
               bn_paths: dict[str, tuple[str, ...]] | None = None):
    path = tuple(name.split("/"))
    try:
      layer = get_path(params, path)
    except (KeyError, TypeError):
      raise ValueError(f"layer {name!r} is not in the variables; allowed: a "
                       "pair of the model's layers") from None
    self.kernel = np.asarray(layer["kernel"], np.float64)
    if bn_paths is None:
      bn_path = path[:-1] + (path[-1] + BN_SUFFIX,)
      has_bn = path[-1] + BN_SUFFIX in get_path(params, path[:-1])
    else:
      bn_path = bn_paths.get(name)
      has_bn = bn_path is not None
    if has_bn:
      if not is_folded({"params": params, "batch_stats": stats},
                       BNPair(name, path, bn_path), eps):
        raise ValueError(f"layer {name!r} has an unfolded BN; allowed: variables "
                         "from haqjax.ptq.folding.fold_batch_norms")
      self.bias_path = bn_path + ("bias",)
    elif "bias" in layer:
      self.bias_path = path + ("bias",)
    else:
      raise ValueError(f"layer {name!r} has no bias or BN; allowed: layers with "
                       "an output bias")
    self.bias = np.asarray(get_path(params, self.bias_path), np.float64)
    self.path = path

  def in_axis(self, channels: int) -> int:
    """The kernel axis of the input channels; the last one for depthwise."""
    k = self.kernel
    if k.ndim == 2 and k.shape[0] == channels:
      return 0
    if k.ndim == 4 and k.shape[2] == channels:
      return 2
    if k.ndim == 4 and k.shape[2] == 1 and k.shape[3] == channels:
      return 3  # Depthwise: input channel i is output channel i.
    raise ValueError(f"kernel of shape {k.shape} does not take {channels} input "
                     "channels; allowed: a pair whose second layer consumes the "
                     "first's output")

  def write(self, params: PyTree) -> None:
    get_path(params, self.path)["kernel"] = jnp.asarray(self.kernel, jnp.float32)
    parent = get_path(params, self.bias_path[:-1])
    parent["bias"] = jnp.asarray(self.bias, jnp.float32)


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
  shape = [1] * ndim
  shape[axis] = -1
  return v.reshape(shape)


def _ranges(kernel: np.ndarray, axis: int) -> np.ndarray:
  axes = tuple(a for a in range(kernel.ndim) if a != axis % kernel.ndim)
  return np.abs(kernel).max(axis=axes)


def channel_ranges(kernel: Array, axis: int = -1) -> Array:
  """`max |kernel|` per channel along `axis` (the output channels by default)."""
  return jnp.asarray(_ranges(np.asarray(kernel), axis))


def _prepare(variables, pairs, relu6, bn_stats, eps, bn_pairs=None):
  _check("relu6", relu6, RELU6_MODES)
  for p in pairs:
    _check(f"act of pair {p.first}->{p.second}", p.act, ACTIVATIONS)
  params = copy_tree(variables["params"])
  stats = variables.get("batch_stats", {})
  bn_paths = None if bn_pairs is None else {p.name: p.bn_path for p in bn_pairs}
  active = [p for p in pairs if p.act != "relu6" or relu6 == "relu"]
  layers: dict[str, _Layer] = {}
  for p in active:
    for name in (p.first, p.second):
      if name not in layers:
        layers[name] = _Layer(params, stats, name, eps, bn_paths)
  bn = None if bn_stats is None else {
      k: (np.asarray(m, np.float64), np.asarray(s, np.float64))
      for k, (m, s) in bn_stats.items()}
  return params, active, layers, bn


def _finish(variables, params, layers, bn, passes) -> Equalized:
  for layer in layers.values():
    layer.write(params)
  bn_out = None if bn is None else {
      k: (jnp.asarray(m, jnp.float32), jnp.asarray(s, jnp.float32))
      for k, (m, s) in bn.items()}
  return Equalized({**variables, "params": params}, bn_out, passes)


def cross_layer_equalization(variables: PyTree,
                             pairs: tuple[EqualizationPair, ...], *,
                             relu6: str = "skip",
                             bn_stats: BNStats | None = None,
                             max_passes: int = 100, tol: float = 1e-3,
                             eps: float = BN_EPSILON,
                             bn_pairs: Sequence[BNPair] | None = None) -> Equalized:
  """Rescales channels so the weight ranges of each pair match.

  Args:
    variables: BN-folded variables; not modified.
    pairs: the pairs to equalize (`equalization_pairs(model)`).
    relu6: 'skip' or 'relu', the handling of ReLU6 pairs (module docstring).
    bn_stats: optional `{layer: (mean, std)}` of BN outputs from before
      folding (`bn_output_stats`), returned rescaled for `absorb_high_bias`.
    max_passes: at most this many sweeps over the pairs.
    tol: stop when every scale of a sweep is within `exp(+-tol)` of 1.
    eps: the BN epsilon (to check the BNs are folded).
    bn_pairs: the layer -> BN pairs holding the layers' biases (a plain
      flax model's `haqjax.ptq.folding.traced_bn_pairs`); None: a layer
      `X`'s BN is its sibling `X_bn`.

  Returns:
    `Equalized(variables, bn_stats, passes)`.

  Raises:
    ValueError: a bad option, an unfolded BN, a layer missing from the
      variables or channels that do not match.
  """
  if not (isinstance(max_passes, int) and max_passes >= 1):
    raise ValueError(f"max_passes is {max_passes!r}; allowed: an integer >= 1")
  if not tol > 0:
    raise ValueError(f"tol is {tol!r}; allowed: a positive number")
  params, active, layers, bn = _prepare(variables, pairs, relu6, bn_stats, eps,
                                        bn_pairs)
  passes = 0
  for passes in range(1, max_passes + 1):
    worst = 0.0
    for p in active:
      a, b = layers[p.first], layers[p.second]
      axis = b.in_axis(a.kernel.shape[-1])
      r1, r2 = _ranges(a.kernel, -1), _ranges(b.kernel, axis)
      ok = (r1 > 0) & (r2 > 0)
      s = np.where(ok, np.sqrt(r1 * r2) / np.where(ok, r2, 1.0), 1.0)  # [C]
      a.kernel = a.kernel / s
      a.bias = a.bias / s
      b.kernel = b.kernel * _along(s, axis, b.kernel.ndim)
      if bn is not None and p.first in bn:
        m, sd = bn[p.first]
        bn[p.first] = (m / s, sd / s)
      worst = max(worst, float(np.abs(np.log(s)).max(initial=0.0)))
    if worst < tol:
      break
  return _finish(variables, params, layers, bn, passes)


def absorb_high_bias(variables: PyTree, pairs: tuple[EqualizationPair, ...],
                     bn_stats: BNStats, *, relu6: str = "skip",
                     n_std: float = 3.0, spatial: bool = True,
                     eps: float = BN_EPSILON,
                     bn_pairs: Sequence[BNPair] | None = None) -> Equalized:
  """Moves `c = max(0, beta - n_std * gamma)` from each `first` into `second`.

  Applies to ReLU pairs (and ReLU6 pairs with `relu6='relu'`). Exact for
  inputs whose pre-activation stays above `c` and for a `second` without
  zero padding (1x1 convs, dense after pooling); at padded borders of a
  k x k `second` the shifted constant is not seen, as in DFQ. On small maps
  that border error dominates (quickstart_cnn at 28x28: 13% of the largest
  logit with every pair, 0.06% with the 1x1/dense ones only), so
  `spatial=False` absorbs only into 1x1 convs and dense layers.

  Args:
    variables: BN-folded (and usually equalized) variables; not modified.
    pairs: the pairs (`equalization_pairs(model)`).
    bn_stats: `{layer: (mean, std)}` of BN outputs matching `variables`
      (from `bn_output_stats` before folding, through
      `cross_layer_equalization`).
    relu6: 'skip' or 'relu', as in `cross_layer_equalization`.
    n_std: the margin in standard deviations.
    spatial: also absorb into seconds with a spatial (k > 1) kernel.
    eps: the BN epsilon.
    bn_pairs: as in `cross_layer_equalization`.

  Returns:
    `Equalized(variables, bn_stats with the means shifted by -c, 1)`.

  Raises:
    ValueError: a bad option, a first layer without statistics, or the
      problems `cross_layer_equalization` reports.
  """
  if not n_std >= 0:
    raise ValueError(f"n_std is {n_std!r}; allowed: a number >= 0")
  params, active, layers, bn = _prepare(variables, pairs, relu6, bn_stats, eps,
                                        bn_pairs)
  for p in active:
    if p.act == "linear":
      continue
    if p.first not in bn:
      raise ValueError(f"bn_stats has no entry for layer {p.first!r}; allowed: "
                       "statistics of every first layer of a pair")
    a, b = layers[p.first], layers[p.second]
    axis = b.in_axis(a.kernel.shape[-1])
    if not spatial and b.kernel.ndim == 4 and b.kernel.shape[:2] != (1, 1):
      continue
    m, sd = bn[p.first]
    c = np.maximum(0.0, m - n_std * sd)  # [C]
    a.bias = a.bias - c
    bn[p.first] = (m - c, sd)
    if axis == 3:  # Depthwise: channel i only sees c_i.
      b.bias = b.bias + b.kernel.sum(axis=(0, 1, 2)) * c
    else:
      b.bias = b.bias + np.tensordot(c, b.kernel, axes=([0], [axis])).reshape(
          -1, b.kernel.shape[-1]).sum(axis=0)
  return _finish(variables, params, layers, bn, 1)
