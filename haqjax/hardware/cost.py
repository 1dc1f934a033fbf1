"""Costs of bit policies on a target: per policy, batched, tensor, expected.

All functions are pure and jitted with the target and metric static, so one
compilation serves every policy of a network (bits are traced arrays):

  * `layer_costs(target, layers, w, a)`: every per-layer cost `[..., L]`;
  * `policy_cost(target, layers, w, a, metric)`: the network total `[...]`;
    bits `[..., L]` broadcast, so `[K, L]` bits give `K` totals (and the
    function also works under `jax.vmap`);
  * `cost_tensor(target, layers, bits, metric)`: `[L, W, A]`, the cost of each
    layer at each candidate `(w, a)` pair, the table HAQ's search reads;
  * `expected_cost(target, layers, w_probs, a_probs, bits, metric)`: the
    expected network cost when layer `l` draws `w` from `w_probs[l]` and `a`
    from `a_probs[l]` independently, `sum_l sum_ij T[l,i,j] p[l,i] q[l,j]`,
    which is differentiable in the probabilities and exact at one-hot inputs.

Metrics: 'latency' (s), 'cycles' and its parts 'compute_cycles' and
'stall_cycles', 'energy' (J) and its parts 'compute_energy', 'sram_energy' and
'dram_energy', 'dram' (bytes), 'size' (bytes), 'kmeans_size' (bytes of k-means
weights, codebooks included) and 'bitops'; the last three need no target
model.

Example::

    layers = hardware.from_model("mobilenet_v2", batch=16)
    target = hardware.get_target("bismo-cloud")
    t = hardware.cost_tensor(target, layers, metric="latency")  # [53, 8, 8]
    total = hardware.policy_cost(target, layers, policy.w_bits, policy.a_bits)
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp

from haqjax.hardware import base
from haqjax.hardware import metrics
from haqjax.hardware.layers import Layers
from haqjax.typing import Array, ArrayLike

DEFAULT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def available_metrics(target: base.Target, layers: Layers) -> tuple[str, ...]:
  """The metric names `target` can report."""
  keys = jax.eval_shape(lambda l: target.layer_cost(l, 8.0, 8.0), layers)
  return tuple(m for m, k in base.METRICS.items()
               if k in keys or m in base.TARGET_FREE)


def _check_metric(metric: str) -> None:
  if metric not in base.METRICS:
    raise ValueError(f"metric is {metric!r}; allowed: {', '.join(base.METRICS)}")


def _layer_metric(target: base.Target, layers: Layers, w: Array, a: Array,
                  metric: str) -> Array:
  if metric in ("size", "kmeans_size"):
    return jnp.broadcast_to(metrics.size_bytes(layers, w, metric == "kmeans_size"),
                            jnp.broadcast_shapes(jnp.shape(w), jnp.shape(a),
                                                 layers.m.shape))
  if metric == "bitops":
    return metrics.bitops(layers, w, a)
  costs = target.layer_cost(layers, w, a)
  key = base.METRICS[metric]
  if key not in costs:
    raise ValueError(f"target {target.name!r} does not model {metric!r}; it "
                     f"reports: {', '.join(sorted(costs))}")
  return costs[key]


@functools.partial(jax.jit, static_argnames=("target",))
def layer_costs(target: base.Target, layers: Layers, w_bits: ArrayLike,
                a_bits: ArrayLike) -> dict[str, Array]:
  """All per-layer costs `[..., L]`, plus the target-free ones (sizes, bitops)."""
  w = jnp.asarray(w_bits, jnp.float32)
  a = jnp.asarray(a_bits, jnp.float32)
  out = dict(target.layer_cost(layers, w, a))
  out["size_bytes"] = _layer_metric(target, layers, w, a, "size")
  out["kmeans_size_bytes"] = _layer_metric(target, layers, w, a, "kmeans_size")
  out["bitops"] = metrics.bitops(layers, w, a)
  return out


def _total(target: base.Target, layers: Layers, w_bits: ArrayLike,
           a_bits: ArrayLike, metric: str) -> Array:
  _check_metric(metric)
  w = jnp.asarray(w_bits, jnp.float32)
  a = jnp.asarray(a_bits, jnp.float32)
  return _layer_metric(target, layers, w, a, metric).sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("target", "metric"))
def policy_cost(target: base.Target, layers: Layers, w_bits: ArrayLike,
                a_bits: ArrayLike, metric: str = "latency") -> Array:
  """Network cost of bits `[..., L]` (float 32 allowed): shape `[...]`."""
  return _total(target, layers, w_bits, a_bits, metric)


@functools.partial(jax.jit, static_argnames=("target", "metric"))
def cost_tensor(target: base.Target, layers: Layers,
                bits: ArrayLike = DEFAULT_BITS, metric: str = "latency") -> Array:
  """Per-layer cost at every candidate pair: `[L, W, A]` for `bits` `[K]`.

  `out[l, i, j]` is layer `l`'s cost at `w = bits[i]`, `a = bits[j]`; with the
  default bits 1..8 this is a HAQ-format table.
  """
  _check_metric(metric)
  b = jnp.asarray(bits, jnp.float32)
  t = _layer_metric(target, layers, b[:, None, None], b[None, :, None], metric)
  t = jnp.broadcast_to(t, (b.size, b.size, len(layers)))
  return jnp.transpose(t, (2, 0, 1))


def expected_from_tensor(tensor: ArrayLike, w_probs: ArrayLike,
                         a_probs: ArrayLike) -> Array:
  """`sum_l sum_ij tensor[l,i,j] w_probs[..., l,i] a_probs[..., l,j]`."""
  return jnp.einsum("lij,...li,...lj->...", tensor, w_probs, a_probs)


@functools.partial(jax.jit, static_argnames=("target", "metric"))
def expected_cost(target: base.Target, layers: Layers, w_probs: ArrayLike,
                  a_probs: ArrayLike, bits: ArrayLike = DEFAULT_BITS,
                  metric: str = "latency") -> Array:
  """Expected network cost under per-layer distributions over `bits`.

  The expectation of a sum over layers is the sum of per-layer expectations,
  and a layer's cost depends on `(w, a)` jointly, so it is the `[L, W, A]`
  cost tensor contracted with the outer product of the two distributions.
  At one-hot `w_probs`, `a_probs` it equals `policy_cost` of those bits.

  Args:
    target: the hardware.
    layers: the network, `L` layers.
    w_probs: `[..., L, K]` probabilities over `bits` for the weights.
    a_probs: `[..., L, K]` probabilities for the activations.
    bits: the `K` candidate bit-widths.
    metric: what to take the expectation of.

  Returns:
    The expected cost, shape `[...]`; differentiable in the probabilities.
  """
  tensor = cost_tensor(target, layers, bits, metric)
  return expected_from_tensor(tensor, w_probs, a_probs)


def batched_policy_cost(target: base.Target, layers: Layers, w_bits: ArrayLike,
                        a_bits: ArrayLike, metric: str = "latency") -> Array:
  """`policy_cost` of `K` policies `[K, L]` in one vmapped, jitted call."""
  return _vmapped(target, metric)(layers, jnp.asarray(w_bits), jnp.asarray(a_bits))


@functools.lru_cache(maxsize=64)
def _vmapped(target: base.Target, metric: str):
  def single(layers, w, a):
    return _total(target, layers, w, a, metric)
  return jax.jit(jax.vmap(single, in_axes=(None, 0, 0)))


def uniform_cost(target: base.Target, layers: Layers, w_bits: float,
                 a_bits: float, metric: str = "latency") -> float:
  """Network cost with every layer at `w_bits`/`a_bits` (a Python float)."""
  shape = (len(layers),)
  return float(policy_cost(target, layers, jnp.full(shape, float(w_bits)),
                           jnp.full(shape, float(a_bits)), metric))
