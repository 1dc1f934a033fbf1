"""Relaxations of a categorical choice: Gumbel-softmax, straight-through, softmax.

Each row of `logits` `[..., K]` parameterises a categorical distribution
`softmax(logits)` over K candidate bit-widths. A relaxation turns it into the
mixing weights of one training step:

* 'gumbel': `softmax((logits + g) / tau)` with `g` standard Gumbel noise, a
  differentiable sample whose argmax is distributed as `softmax(logits)`
  (Jang et al. 2017; Maddison et al. 2017); DNAS's relaxation (Wu et al.
  2018). As `tau -> 0` samples become one-hot.
* 'hard': the straight-through Gumbel estimator: the forward value is the
  one-hot argmax of the 'gumbel' sample, the gradient that of the soft
  sample, so the network is trained at one discrete policy per step.
* 'softmax': `softmax(logits / tau)`, no noise (EdMIPS, Cai & Vasconcelos
  2020, with `tau = 1`).

The temperature anneals exponentially, `tau0 * (tau_min / tau0) ** t` with
`t` the fraction of the annealing done, and is an array so that sweeping it
never recompiles.

References:
  Jang, Gu & Poole. Categorical Reparameterization with Gumbel-Softmax.
  ICLR 2017. https://arxiv.org/abs/1611.01144
  Maddison, Mnih & Teh. The Concrete Distribution. ICLR 2017.
  https://arxiv.org/abs/1611.00712
  Wu et al. Mixed Precision Quantization of ConvNets via Differentiable
  Neural Architecture Search. 2018. https://arxiv.org/abs/1812.00090
  Cai & Vasconcelos. Rethinking Differentiable Search for Mixed-Precision
  Neural Networks. CVPR 2020. https://arxiv.org/abs/2004.05795
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from haqjax.typing import Array, ArrayLike, PRNGKey

RELAXATIONS = ("gumbel", "hard", "softmax")


def check_relaxation(relaxation: str) -> None:
  if relaxation not in RELAXATIONS:
    raise ValueError(f"gumbel_relaxation={relaxation!r} is not allowed; allowed: "
                     f"{', '.join(RELAXATIONS)}")


def temperature(step: ArrayLike, tau0: ArrayLike, tau_min: ArrayLike,
                start: ArrayLike, length: ArrayLike) -> Array:
  """`tau0` until `start`, then exponential decay to `tau_min` over `length` steps."""
  t = jnp.clip((jnp.asarray(step, jnp.float32) - start) / jnp.maximum(length, 1.0),
               0.0, 1.0)
  tau0 = jnp.asarray(tau0, jnp.float32)
  return tau0 * (jnp.asarray(tau_min, jnp.float32) / tau0) ** t


def gumbel_softmax(key: PRNGKey, logits: Array, tau: ArrayLike) -> Array:
  """A soft sample `softmax((logits + g) / tau)`, `g ~ Gumbel(0, 1)`, `[..., K]`."""
  g = jax.random.gumbel(key, logits.shape, jnp.float32)
  # Times 1 / tau, not divided by tau: XLA turns a division by a broadcast
  # scalar into that product in some programs only (here the vmapped step and
  # not the single search's), an ulp apart (`batch_invariant`).
  return jax.nn.softmax((logits + g) * (1.0 / tau), axis=-1)


def straight_through(soft: Array) -> Array:
  """One-hot argmax of `soft` in the forward pass, the gradient of `soft`."""
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
  return soft + jax.lax.stop_gradient(hard - soft)


def relax(key: PRNGKey, logits: Array, tau: ArrayLike, relaxation: str) -> Array:
  """The mixing weights `[..., K]` of one step (see the module docstring).

  Args:
    key: randomness of the Gumbel noise (unused by 'softmax').
    logits: `[..., K]` unnormalised log-probabilities.
    tau: temperature (> 0), a scalar array.
    relaxation: 'gumbel', 'hard' or 'softmax' (static).

  Returns:
    Rows that sum to 1; one-hot in value for 'hard'.
  """
  check_relaxation(relaxation)
  if relaxation == "softmax":
    return jax.nn.softmax(logits * (1.0 / tau), axis=-1)  # As gumbel_softmax.
  soft = gumbel_softmax(key, logits, tau)
  return straight_through(soft) if relaxation == "hard" else soft
