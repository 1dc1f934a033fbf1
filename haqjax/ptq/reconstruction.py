"""The layer-output reconstruction loss that AdaRound minimises.

For a layer with kernel `W`, bias `b` and optional activation `f`, a candidate
kernel `w` is scored by

    E||f(W x_t + b) - f(w x + b)||^2,

summed over output channels and averaged over the other output positions
(examples, pixels), as in the AdaRound authors' reference code. `x` is the
layer's input (floating point, or the output of already-quantized preceding
layers) and `x_t` the input the target is computed from (default `x`); `f`
defaults to the identity (the pre-activation output, as needed when
BatchNorm follows the layer).

Two objectives compute it:

* 'moments' (no activation): the loss is quadratic in the weights. With
  `w = W + dW` and `d = x - x_t` (0 when `x_t = x`), over im2col patches,

      E||W^T x_t - w^T x||^2 = tr(dW^T E[x x^T] dW) + 2 tr(dW^T E[x d^T] W)
                               + E||W^T d||^2,

  so the second moments are accumulated once over all calibration inputs
  (`second_moments`) and every evaluation costs `k^2 * out` multiply-adds
  (k = kh * kw * in/groups) whatever their number: the exact full-data loss,
  with no mini-batch noise.
* 'minibatch': each step samples `batch_size` examples (the paper's
  procedure); needed with an activation. On CPU, where convolution backward
  passes are slow, it is tens of times slower (quickstart CNN conv1, 200
  steps of 32 images: 9.3 s against 0.25 s).

References:
  Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
  Quantization", ICML 2020.
  Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by
  Block Reconstruction", ICLR 2021 (reference implementation of AdaRound).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from haqjax.ptq.layer_geometry import EXACT
from haqjax.ptq.layer_geometry import LayerGeometry
from haqjax.ptq.layer_geometry import group_kernel
from haqjax.ptq.layer_geometry import patches
from haqjax.typing import Array, PRNGKey

OBJECTIVES = ("auto", "minibatch", "moments")


class Reconstruction(NamedTuple):
  """The loss of a candidate kernel `w`, as two functions.

  Attributes:
    full: `full(w)`, the loss over all calibration inputs.
    batch: `batch(w, step)`, the loss a training step minimises: `full(w)`
      for 'moments', a mini-batch drawn with `fold_in(key, step)` for
      'minibatch' (the target enters through `stop_gradient`).
  """
  full: Callable[[Array], Array]
  batch: Callable[[Array, Array], Array]


def second_moments(inputs: Array, target_inputs: Array | None,
                   geometry: LayerGeometry, kernel: Array, chunk: int
                   ) -> tuple[Array, Array, Array]:
  """Second moments of the patches of `x` and `d = x - x_t`, over all rows.

  Returns `(E[x x^T] [g, k, k], E[x d^T] W [g, k, out/g], E||W^T d||^2)`; the
  last two are 0 without `target_inputs`. Accumulated `chunk` examples at a
  time (zero padding rows add nothing), so memory stays at one chunk of
  patches.
  """
  n = inputs.shape[0]
  pad = -n % chunk

  def split(x):
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, chunk, *x.shape[1:])

  wg = group_kernel(kernel, geometry)
  rows = patches(inputs[:1], geometry, kernel.shape).shape[0] * n
  g, k = wg.shape[0], wg.shape[1]
  if target_inputs is None:
    def body(acc, x):
      p = patches(x, geometry, kernel.shape)
      return acc + jnp.einsum("rgk,rgl->gkl", p, p, precision=EXACT), None
    gxx, _ = jax.lax.scan(body, jnp.zeros((g, k, k)), split(inputs))
    return gxx / rows, jnp.zeros_like(wg), jnp.float32(0.0)

  def body_t(acc, xs):
    p = patches(xs[0], geometry, kernel.shape)
    d = p - patches(xs[1], geometry, kernel.shape)
    dw = jnp.einsum("rgk,gko->rgo", d, wg, precision=EXACT)
    return (acc[0] + jnp.einsum("rgk,rgl->gkl", p, p, precision=EXACT),
            acc[1] + jnp.einsum("rgk,rgo->gko", p, dw, precision=EXACT),
            acc[2] + jnp.sum(jnp.square(dw))), None
  init = (jnp.zeros((g, k, k)), jnp.zeros_like(wg), jnp.float32(0.0))
  (gxx, b, c), _ = jax.lax.scan(body_t, init, (split(inputs), split(target_inputs)))
  return gxx / rows, b / rows, c / rows


def reconstruction(key: PRNGKey, kernel: Array, bias: Array | None, inputs: Array,
                   target_inputs: Array | None, *, geometry: LayerGeometry,
                   act_fn: Callable[[Array], Array] | None, objective: str,
                   batch_size: int) -> Reconstruction:
  """The reconstruction loss of the layer `(kernel, bias, geometry, act_fn)`.

  Meant to be called inside `jit`; 'moments' accumulates the second moments
  here, once.

  Args:
    key: PRNG key of the mini-batch sampling (unused by 'moments').
    kernel: the floating-point kernel `W` the target is computed with.
    bias: the layer's bias `[out]`, added before `act_fn`, or None.
    inputs: the layer's inputs `x`, `[N, H, W, in]` (conv) or `[N, in]`.
    target_inputs: the target's inputs `x_t`, same shape, or None for `x`.
    geometry: the layer's linear map.
    act_fn: activation applied to both outputs, or None.
    objective: 'moments' (requires `act_fn=None`) or 'minibatch'; static.
    batch_size: 'minibatch': examples per step, sampled without replacement;
      'moments': examples per accumulation chunk (static, at most N).

  Returns:
    A `Reconstruction`.
  """
  act = (lambda y: y) if act_fn is None else act_fn
  x_t_all = inputs if target_inputs is None else target_inputs

  def output(x, w):
    y = geometry.apply(x, w)
    return act(y if bias is None else y + bias)

  def recon(y_t, y):  # sum over output channels, mean over positions
    return jnp.mean(jnp.sum(jnp.square(y_t - y), axis=-1))

  if objective == "moments":
    gxx, gxd_w, c = second_moments(inputs, target_inputs, geometry, kernel, batch_size)
    w_g = group_kernel(kernel, geometry)

    def full_recon(w):  # E||W^T x_t - w^T x||^2 = E||dW^T x + W^T d||^2
      dw = group_kernel(w, geometry) - w_g
      return (jnp.sum(dw * jnp.einsum("gkl,glo->gko", gxx, dw, precision=EXACT))
              + 2.0 * jnp.sum(dw * gxd_w) + c)

    def batch_recon(w, i):
      del i
      return full_recon(w)
  else:
    n = inputs.shape[0]

    def full_recon(w):
      return recon(output(x_t_all, kernel), output(inputs, w))

    def batch_recon(w, i):
      rows = jax.random.choice(jax.random.fold_in(key, i), n, (batch_size,),
                               replace=False)
      y_t = jax.lax.stop_gradient(output(x_t_all[rows], kernel))
      return recon(y_t, output(inputs[rows], w))

  return Reconstruction(full=full_recon, batch=batch_recon)
