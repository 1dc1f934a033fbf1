"""Target-independent costs: model size, BitOps and the roofline bound.

These need no accelerator model, so every target reports them:

  * size: `w` bits per weight plus 32-bit biases; a k-means (codebook)
    quantized layer also stores its `2**w` 32-bit centroids (Deep Compression,
    as HAQ's model-size search does: metric 'kmeans_size'), as
    `haqjax.quant.kmeans_size_bits` counts them.
  * BitOps: `MACs * w * a`, the compute measure of mixed-precision papers.
    Floating point (32 bits) counts as 32.
  * roofline: `max(ops / peak ops per s, bytes / peak bytes per s)`.

References:
  S. Han, H. Mao, W. Dally, "Deep Compression", ICLR 2016.
  S. Williams, A. Waterman, D. Patterson, "Roofline: an insightful visual
  performance model for multicore architectures", CACM 2009.
"""

from __future__ import annotations

import jax.numpy as jnp

from haqjax.hardware.layers import Layers
from haqjax.quant.codebook import kmeans_size_bits
from haqjax.typing import Array, ArrayLike

# Bits of one stored centroid of a k-means codebook (a float32).
CODEBOOK_BITS = 32


def size_bits(layers: Layers, w_bits: ArrayLike, kmeans: bool = False) -> Array:
  """Stored bits per layer `[..., L]`: weights at `w_bits`, biases at 32.

  Args:
    layers: the network.
    w_bits: weight bits, broadcastable to `[..., L]` (32: float).
    kmeans: store the weights as k-means labels of `w` bits plus a
      `2**w`-entry codebook of `CODEBOOK_BITS` centroids per layer (none
      at 32 bits: float weights), `kmeans_size_bits`.
  """
  w = jnp.asarray(w_bits, jnp.float32)
  if kmeans:
    weights = kmeans_size_bits(layers.weights, w, CODEBOOK_BITS)
  else:
    weights = layers.weights * w
  return weights + layers.biases * 32.0


def size_bytes(layers: Layers, w_bits: ArrayLike, kmeans: bool = False) -> Array:
  """`size_bits / 8`."""
  return size_bits(layers, w_bits, kmeans) / 8.0


def bitops(layers: Layers, w_bits: ArrayLike, a_bits: ArrayLike) -> Array:
  """`MACs * w * a` per layer `[..., L]` (MACs of the layers' batch)."""
  w = jnp.asarray(w_bits, jnp.float32)
  a = jnp.asarray(a_bits, jnp.float32)
  return layers.macs * w * a


def roofline_s(ops: ArrayLike, traffic_bytes: ArrayLike, peak_ops_per_s: float,
               peak_bytes_per_s: float) -> Array:
  """The roofline time bound: the slower of compute and memory traffic."""
  return jnp.maximum(jnp.asarray(ops, jnp.float32) / peak_ops_per_s,
                     jnp.asarray(traffic_bytes, jnp.float32) / peak_bytes_per_s)
