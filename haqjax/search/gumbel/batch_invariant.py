"""Parts of the search step written to give the same bits vmapped and unbatched.

A sweep runs K searches as one `jax.vmap` of the step (`supernet`), and each
member must follow the trajectory that the same search takes alone. One ulp
of difference is enough to break that: the step fake-quantizes, a value whose
`x / scale` lies within a few ulps of a rounding boundary moves to the other
code, and the next gradients differ by far more than an ulp (one flipped code
in the classifier's 8-bit input moved a search's architecture logits by 7e-4
after three steps).

XLA compiles the batched program and the single one separately and does not
promise the same float arithmetic in both. Two of its choices differed in the
search step, and this module writes those computations so that both programs
do the same operations:

* a division by a broadcast value (a temperature, a bias correction) is
  rewritten into a multiplication by the reciprocal in some programs and not
  others; here the reciprocal is taken on the scalar and multiplied in
  (`relax` scales its logits the same way);
* `jnp.einsum` contracts by `dot_general`, whose summation order differs
  between the batched and the single contraction; `mixture_cost` is
  elementwise products and a sum instead, which XLA computes alike in both
  programs, value and gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from haqjax.typing import Array, ArrayLike


def mixture_cost(tensor: ArrayLike, w_probs: Array, a_probs: Array) -> Array:
  """`sum_l sum_ij tensor[l,i,j] w_probs[l,i] a_probs[l,j]`, `[]`.

  The value of `haqjax.hardware.expected_from_tensor` (to rounding), as
  products and one sum, so that it and its gradient are the same in a vmapped
  program and in a single one.

  Args:
    tensor: `[L, K, K]` costs of the candidates.
    w_probs: `[L, K]` weight mixing weights.
    a_probs: `[L, K]` activation mixing weights.

  Returns:
    The expected cost.
  """
  return jnp.sum(jnp.asarray(tensor) * w_probs[:, :, None] * a_probs[:, None, :])


def scale_by_adam(b1: float = 0.9, b2: float = 0.999,
                  eps: float = 1e-8) -> optax.GradientTransformation:
  """`optax.scale_by_adam` whose bias corrections are multiplied in.

  The moments, the state (`optax.ScaleByAdamState`, so checkpoints load
  either way) and the update `mu_hat / (sqrt(nu_hat) + eps)` are those of
  optax; `mu_hat = mu * (1 / (1 - b1^t))` instead of `mu / (1 - b1^t)`, a
  division by a broadcast scalar that XLA rewrote in one of the two programs
  only.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator.

  Returns:
    The transformation.

  References:
    Kingma & Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
    https://arxiv.org/abs/1412.6980
  """

  def init(params):
    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(params),
                                  nu=zeros(params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
    nu = jax.tree.map(lambda g, v: (1 - b2) * (g * g) + b2 * v, updates, state.nu)
    count = jnp.where(state.count < jnp.iinfo(jnp.int32).max, state.count + 1,
                      state.count)
    mu_correction = 1.0 / (1.0 - b1 ** count)  # [] scalars
    nu_correction = 1.0 / (1.0 - b2 ** count)
    out = jax.tree.map(
        lambda m, v: (m * mu_correction) / (jnp.sqrt(v * nu_correction) + eps), mu, nu)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)
