"""K-means weight sharing: a codebook of 2**bits shared values per layer.

Deep Compression (Han et al., 2016) clusters a layer's weights with k-means,
stores each weight as the index of its cluster (`bits` bits) plus one float
codebook of 2**bits centroids, and fine-tunes the centroids with gradients
aggregated per cluster. HAQ's model-size mode (Wang et al., 2019) quantizes
with the same scheme.

The clustering is `haqjax.quant.kmeans1d` (bits traced: a 256-entry codebook
whose first 2**bits entries are active). This module holds what is built on
it: the per-cluster centroid gradients (`centroid_grads`), the storage size
of a k-means quantized layer (`kmeans_size_bits`) and the quantizer
(`KMeansWeight`).

References:
  Han, Mao & Dally. Deep Compression: Compressing Deep Neural Networks with
    Pruning, Trained Quantization and Huffman Coding. ICLR 2016.
  Wang, Liu, Lin, Lin & Han. HAQ: Hardware-Aware Automated Quantization with
    Mixed Precision. CVPR 2019.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from haqjax.policy import FLOAT_BITS
from haqjax.quant.base import Quantizer
from haqjax.quant.base import passthrough
from haqjax.quant.kmeans1d import INITS
from haqjax.quant.kmeans1d import NUM_CENTROIDS
from haqjax.quant.kmeans1d import assign
from haqjax.quant.kmeans1d import kmeans
from haqjax.quant.kmeans1d import num_clusters
from haqjax.typing import Array, ArrayLike, PRNGKey, PyTree

GRAD_RULES = ("sum", "mean")
WEIGHT_GRADS = ("none", "ste")


def centroid_grads(grad_w: ArrayLike, labels: ArrayLike, rule: str = "mean",
                   num_centroids: int = NUM_CENTROIDS) -> Array:
  """Gradient of each shared value, aggregated over its cluster's weights.

  Args:
    grad_w: gradient of the loss with respect to each (shared) weight.
    labels: cluster index of each weight, same shape.
    rule: 'sum' (Deep Compression: the sum over the cluster, the exact
      gradient of the shared value) or 'mean' (HAQ: the sum divided by the
      cluster size, what averaging the weights of a cluster after each SGD
      step amounts to).
    num_centroids: codebook length.

  Returns:
    `[num_centroids]` float32; 0 for empty clusters.

  Raises:
    ValueError: for an unknown rule.

  References:
    Han, Mao & Dally. Deep Compression. ICLR 2016 (equation 3).
    Wang et al. HAQ. CVPR 2019.
  """
  if rule not in GRAD_RULES:
    raise ValueError(f"rule is {rule!r}; allowed: {', '.join(GRAD_RULES)}")
  labels = jnp.asarray(labels).ravel()
  g = jax.ops.segment_sum(jnp.asarray(grad_w, jnp.float32).ravel(), labels,
                          num_centroids)
  if rule == "mean":
    counts = jax.ops.segment_sum(jnp.ones_like(labels, jnp.float32), labels,
                                 num_centroids)
    g = g * (1.0 / jnp.maximum(counts, 1.0))
  return g


def _shared_values(codebook: Array, labels: Array, rule: str) -> Array:
  """`codebook[labels]` whose codebook gradient follows `rule`."""
  if rule == "sum":
    return codebook[labels]  # The gather's transpose sums per cluster.
  counts = jax.ops.segment_sum(jnp.ones(labels.size, jnp.float32),
                               labels.ravel(), codebook.shape[0])
  scaled = codebook * jax.lax.stop_gradient(1.0 / jnp.maximum(counts, 1.0))
  sg = jax.lax.stop_gradient
  return sg(codebook)[labels] + (scaled - sg(scaled))[labels]  # Forward: + 0.


def kmeans_size_bits(num_weights: ArrayLike, bits: ArrayLike,
                     codebook_bits: ArrayLike = 32) -> Array:
  """Storage of a k-means quantized layer: labels plus the codebook, in bits.

  `num_weights * bits + 2**bits * codebook_bits`, or `num_weights * 32` for
  `bits >= FLOAT_BITS` (no codebook). Broadcasts over arrays (e.g. a vector
  of per-layer sizes and bits); float32, exact up to 2**24 bits.

  References:
    Han, Mao & Dally. Deep Compression. ICLR 2016 (section 3.1).
  """
  n = jnp.asarray(num_weights, jnp.float32)
  bits = jnp.asarray(bits, jnp.int32)
  quantized = n * bits + num_clusters(bits).astype(jnp.float32) * codebook_bits
  return jnp.where(bits >= FLOAT_BITS, n * float(FLOAT_BITS), quantized)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KMeansWeight(Quantizer):
  """Weight sharing through a trainable k-means codebook.

  Params: `{"codebook": [256] float32}`. `init` returns zeros (every weight
  then maps to 0): run `calibrate` on the real kernel, which runs `kmeans`
  for that bit-width. A codebook is made for one bit-width: calling with
  other bits uses its first 2**bits entries.

  `__call__` maps each weight to its nearest active centroid (the assignment
  is recomputed every call, without gradient) and returns
  `codebook[labels]`. Gradients: the codebook gets the per-cluster sum
  (`grad_rule='sum'`, Deep Compression) or mean (`'mean'`, HAQ) of the
  weights' gradients; the float weights get none (`weight_grad='none'`,
  Deep Compression's frozen assignment) or the identity
  (`weight_grad='ste'`, so they can drift to other clusters). At
  `bits >= FLOAT_BITS` the weights pass through unchanged. NaN weights stay
  NaN.

  Attributes:
    grad_rule: 'mean' or 'sum', see `centroid_grads`.
    weight_grad: 'none' or 'ste'.
    init_method: k-means start in `calibrate`, 'linear' or 'kmeans++'.
    iters: Lloyd iterations in `calibrate`.
    seed: seed of the k-means++ key (`calibrate` takes no key).

  References:
    Han, Mao & Dally. Deep Compression. ICLR 2016.
    Wang et al. HAQ. CVPR 2019.
  """
  grad_rule: str = "mean"
  weight_grad: str = "none"
  init_method: str = "linear"
  iters: int = 100
  seed: int = 0

  def __post_init__(self):
    if self.grad_rule not in GRAD_RULES:
      raise ValueError(f"grad_rule is {self.grad_rule!r}; allowed: {', '.join(GRAD_RULES)}")
    if self.weight_grad not in WEIGHT_GRADS:
      raise ValueError(f"weight_grad is {self.weight_grad!r}; allowed: "
                       f"{', '.join(WEIGHT_GRADS)}")
    if self.init_method not in INITS:
      raise ValueError(f"init_method is {self.init_method!r}; allowed: {', '.join(INITS)}")
    if not isinstance(self.iters, int) or self.iters < 0:
      raise ValueError(f"iters is {self.iters!r}; allowed: an integer >= 0")

  def init(self, x: Array) -> PyTree:
    del x
    return {"codebook": jnp.zeros((NUM_CENTROIDS,), jnp.float32)}

  def calibrate(self, params: PyTree, x: Array, bits: ArrayLike) -> PyTree:
    res = kmeans(jax.random.key(self.seed), jax.lax.stop_gradient(x), bits,
                 iters=self.iters, init=self.init_method)
    return {**params, "codebook": res.codebook}

  def __call__(self, params: PyTree, x: Array, bits: ArrayLike,
               key: PRNGKey | None = None) -> Array:
    del key
    codebook = params["codebook"]
    labels = assign(jax.lax.stop_gradient(codebook), jax.lax.stop_gradient(x), bits)
    q = _shared_values(codebook, labels, self.grad_rule).astype(x.dtype)
    if self.weight_grad == "ste":
      q = q + (x - jax.lax.stop_gradient(x))
    q = jnp.where(jnp.isnan(x), x, q)
    return passthrough(x, q, bits)
