"""BatchNorm folding: each conv-BN pair becomes a conv with a bias.

At inference a BatchNorm after a convolution is an affine map per output
channel, `y = gamma * (z - mean) / sqrt(var + eps) + beta`, so it merges into
the convolution: the kernel's output channel `o` is multiplied by
`gamma_o / sqrt(var_o + eps)` and the bias becomes
`beta_o - mean_o * gamma_o / sqrt(var_o + eps)` (Nagel et al. 2021, section
3.2; Jacob et al. 2018). Quantizing the folded kernel is what an integer
accelerator executes, so the weight quantizer must see it.

`fold_batch_norms` keeps the variables' tree structure, so the same model
runs them unchanged: the kernel is replaced by the folded kernel and the BN
becomes the identity plus the folded bias (mean 0, scale 1 and a variance
`v` with `v + eps == 1` exactly in float32, so `rsqrt(v + eps)` is exactly
1). Conv-BN pairs are found by the zoo's naming convention (`conv_bn` in
`haqjax.models.cnn`): a layer `X` (a dict with a `kernel`) and a sibling
`X_bn` in the same scope, with `mean`/`var` in `batch_stats`. For a model
the user wrote with flax layers (`haqjax.nn.quantized`), whose names follow
no convention, `traced_bn_pairs` finds them from the traced computation
instead (a BN whose input is a layer's output), and `fold_batch_norms` and
`bn_output_stats` take those pairs.

The array maths, `folded_kernel_and_bias` (the pure function a QAT step
with folded BN calls on the live parameters, Krishnamoorthi 2018, section
3.2), and `BN_EPSILON` live in `haqjax.nn.bn_folding`, below the layers that
fold on every call; this module applies them to a model's variables.

Folding stales calibrated weight-quantizer parameters (LSQ steps, static
ranges, codebooks): run `haqjax.nn.calibrate.calibrate` after folding.

`bn_output_stats` keeps what later passes need from the BNs before folding:
DFQ's high-bias absorption and analytic bias correction model each BN's
output channel as `N(beta, gamma^2)`, which folding erases.

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

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from haqjax.nn.bn_folding import BN_EPSILON
from haqjax.nn.bn_folding import check_eps
from haqjax.nn.bn_folding import folded_kernel_and_bias
from haqjax.nn.dataflow import conv_bn_pairs
from haqjax.treeutil import copy_tree
from haqjax.treeutil import get_path
from haqjax.typing import Array, PyTree

BN_SUFFIX = "_bn"


class BNPair(NamedTuple):
  """A layer and the BatchNorm that follows it.

  Attributes:
    name: the layer's name (its module path joined by '/', as the policy).
    path: the layer's module path.
    bn_path: the BatchNorm's module path (a sibling named `name + '_bn'`).
  """
  name: str
  path: tuple[str, ...]
  bn_path: tuple[str, ...]


def identity_variance(eps: float = BN_EPSILON, dtype: Any = jnp.float32) -> Array:
  """A variance `v` with `v + eps == 1` exactly in `dtype`, so `rsqrt(v + eps)` is 1."""
  check_eps(eps)
  dtype = np.dtype(dtype)
  v = dtype.type(1) - dtype.type(eps)
  while dtype.type(v + dtype.type(eps)) > 1:
    v = np.nextafter(v, dtype.type(0))
  while dtype.type(v + dtype.type(eps)) < 1:
    v = np.nextafter(v, dtype.type(2))
  return jnp.asarray(v, dtype)


def bn_pairs(variables: PyTree) -> tuple[BNPair, ...]:
  """Every layer `X` followed by a BatchNorm `X_bn`, found by name.

  A pair is a dict `X` with a `kernel` in `params` and a sibling `X_bn` with
  `mean` and `var` in `batch_stats` (the convention of
  `haqjax.models.cnn.conv_bn`).

  Args:
    variables: `{"params": ..., "batch_stats": ...}`.

  Returns:
    The pairs, in the order of a depth-first walk of `params`.

  Raises:
    ValueError: if `params` or `batch_stats` is missing.
  """
  for field in ("params", "batch_stats"):
    if field not in variables:
      raise ValueError(f"variables have no {field!r} collection; allowed: "
                       "{'params': ..., 'batch_stats': ...}")
  found: list[BNPair] = []

  def walk(params: Mapping, stats: Mapping | None, path: tuple[str, ...]):
    for key, sub in params.items():
      if not isinstance(sub, Mapping):
        continue
      bn = (stats or {}).get(key + BN_SUFFIX)
      if ("kernel" in sub and isinstance(bn, Mapping) and "mean" in bn
          and "var" in bn):
        found.append(BNPair("/".join(path + (key,)), path + (key,),
                            path + (key + BN_SUFFIX,)))
      walk(sub, (stats or {}).get(key), path + (key,))

  walk(variables["params"], variables["batch_stats"], ())
  return tuple(found)


def traced_bn_pairs(model: Any, variables: PyTree, input_shape: Sequence[int], *,
                    eps: float = BN_EPSILON, **call_kwargs: Any) -> tuple[BNPair, ...]:
  """Every `nn.Conv`/`nn.Dense` whose output feeds an `nn.BatchNorm`, by data flow.

  The model is traced abstractly in eval mode (`haqjax.nn.conv_bn_pairs`);
  names play no part.

  Args:
    model: a flax model, e.g. a `haqjax.nn.quantized` plain flax model.
    variables: its variables (arrays or shapes).
    input_shape: the shape of its input.
    eps: the epsilon folding will use; each paired BN must have it.
    **call_kwargs: other arguments of the model's `__call__`.

  Returns:
    The pairs, in the order their BatchNorms run.

  Raises:
    ValueError: a paired BN's epsilon differs from `eps`.
  """
  check_eps(eps)
  pairs = []
  for found in conv_bn_pairs(model, variables, input_shape, **call_kwargs):
    if not np.isclose(found.epsilon, eps, rtol=1e-6, atol=0.0):
      raise ValueError(f"BN {'/'.join(found.bn_path)!r} has epsilon {found.epsilon:g}; "
                       f"allowed: the folding epsilon eps={eps:g} (pass eps={found.epsilon:g})")
    pairs.append(BNPair("/".join(found.path), found.path, found.bn_path))
  return tuple(pairs)


def is_folded(variables: PyTree, pair: BNPair, eps: float = BN_EPSILON) -> bool:
  """Whether the BN of `pair` is the identity plus a bias (as folding leaves it)."""
  bn = get_path(variables["params"], pair.bn_path)
  stats = get_path(variables["batch_stats"], pair.bn_path)
  one = np.asarray(stats["var"]) + np.asarray(eps, np.asarray(stats["var"]).dtype)
  return bool(np.all(np.asarray(stats["mean"]) == 0) and np.all(one == 1)
              and np.all(np.asarray(bn.get("scale", 1.0)) == 1))


def fold_batch_norms(model: Any, variables: PyTree, *,
                     eps: float = BN_EPSILON,
                     pairs: Sequence[BNPair] | None = None) -> PyTree:
  """Variables with every conv-BN pair folded; the same model runs them.

  Args:
    model: the model the variables belong to. Pairs are found from the
      variables' names (`X` and `X_bn`, see `bn_pairs`) unless given; the
      argument keeps the `(model, variables)` signature of the PTQ passes.
    variables: `{"params": ..., "batch_stats": ...}` with trained BNs; not
      modified.
    eps: the models' BN epsilon (`haqjax.nn.bn_folding.BN_EPSILON`).
    pairs: the pairs to fold (e.g. `traced_bn_pairs` of a plain flax
      model); None: `bn_pairs(variables)`.

  Returns:
    New variables of the same tree structure: each paired kernel is folded,
    each BN is the identity plus the folded bias. Layers that were already
    folded are unchanged; other leaves are shared with `variables`.

  Raises:
    ValueError: missing collections, a bad `eps` or mis-shaped BN arrays.
  """
  del model
  check_eps(eps)
  pairs = bn_pairs(variables) if pairs is None else tuple(pairs)
  params = copy_tree(variables["params"])
  stats = copy_tree(variables["batch_stats"])
  for pair in pairs:
    if is_folded(variables, pair, eps):
      continue
    layer = get_path(params, pair.path)
    bn = get_path(params, pair.bn_path)
    bn_stats = get_path(stats, pair.bn_path)
    if "bias" not in bn:
      raise ValueError(f"BN {'/'.join(pair.bn_path)!r} has no bias; allowed: "
                       "BatchNorm with use_bias=True, which holds the folded bias")
    # numpy in float64: no per-shape compilation, and one rounding at the end.
    as64 = lambda t: {k: np.asarray(v, np.float64) for k, v in t.items()
                      if k in ("scale", "bias", "mean", "var")}
    own = layer.get("bias")
    kernel, bias = folded_kernel_and_bias(
        np.asarray(layer["kernel"], np.float64), as64(bn), as64(bn_stats), eps,
        None if own is None else np.asarray(own, np.float64), xp=np)
    layer["kernel"] = jnp.asarray(kernel, jnp.asarray(layer["kernel"]).dtype)
    if own is not None:  # The layer's own bias moved into the BN's.
      layer["bias"] = jnp.zeros_like(own)
    dtype = jnp.asarray(bn_stats["var"]).dtype
    out = kernel.shape[-1]
    bn_stats["mean"] = jnp.zeros(out, dtype)
    bn_stats["var"] = jnp.full(out, identity_variance(eps, dtype), dtype)
    if "scale" in bn:
      bn["scale"] = jnp.ones(out, jnp.asarray(bn["scale"]).dtype)
    bn["bias"] = jnp.asarray(bias, jnp.asarray(bn["bias"]).dtype)
  return {**variables, "params": params, "batch_stats": stats}


def bn_output_stats(variables: PyTree, eps: float = BN_EPSILON,
                    pairs: Sequence[BNPair] | None = None
                    ) -> dict[str, tuple[Array, Array]]:
  """Per-channel mean and std of each BN's output, `(beta, |gamma|)`.

  A BN normalises its input to zero mean and unit variance on the data its
  statistics came from, so its output channel is modelled as
  `N(beta, gamma^2)` (DFQ section 4.2). Take these from the variables before
  folding; `haqjax.ptq.equalization` keeps them up to date through its
  rescaling.

  Args:
    variables: unfolded variables.
    eps: the BN epsilon (to tell folded BNs, which have lost gamma).
    pairs: the conv-BN pairs; None: `bn_pairs(variables)`.

  Returns:
    `{layer name: (mean [C], std [C])}` for every conv-BN pair.

  Raises:
    ValueError: if a BN is already folded (its gamma is gone).
  """
  out = {}
  for pair in bn_pairs(variables) if pairs is None else pairs:
    if is_folded(variables, pair, eps):
      raise ValueError(f"layer {pair.name!r} has a folded BN; allowed: variables "
                       "from before fold_batch_norms")
    bn = get_path(variables["params"], pair.bn_path)
    c = np.asarray(get_path(variables["batch_stats"], pair.bn_path)["mean"]).shape[0]
    out[pair.name] = (jnp.asarray(bn.get("bias", jnp.zeros(c))),
                      jnp.abs(jnp.asarray(bn.get("scale", jnp.ones(c)))))
  return out
