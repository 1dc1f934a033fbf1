"""Tests for haqjax.nn.batching: a convolution that stays dense under vmap."""

import functools
import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from haqjax.nn import batching

K = 3


def _reference(x, w, strides, padding, groups):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _ours(x, w, strides, padding, groups):
  return batching.conv(x, w, window_strides=strides, padding=padding,
                       feature_group_count=groups)


def _loss(conv_fn, x, w):
  y = conv_fn(x, w)
  return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1]))


def _hlo_convs(fn, *args) -> list[int]:
  """The feature_group_count of every convolution XLA compiles for `fn`."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  lines = [l for l in text.splitlines() if " convolution(" in l]
  return [int(m.group(1)) if (m := re.search(r"feature_group_count=(\d+)", l)) else 1
          for l in lines]


CASES = (
    ("dense_same", (1, 1), "SAME", 1, 4),
    ("strided_explicit_padding", (2, 2), ((1, 0), (0, 1)), 1, 4),
    ("grouped", (1, 1), "VALID", 2, 4),
    ("depthwise", (2, 1), "SAME", 4, 4),
)


class ConvTest(parameterized.TestCase):

  def _data(self, groups, in_ch, members=None):
    kx, kw = jax.random.split(jax.random.key(0))
    lead = () if members is None else (members,)
    x = jax.random.normal(kx, lead + (2, 7, 6, in_ch))
    w = jax.random.normal(kw, lead + (3, 2, in_ch // groups, 8)) * 0.3
    return x, w

  @parameterized.named_parameters(*CASES)
  def test_value_and_grad_equal_lax(self, strides, padding, groups, in_ch):
    x, w = self._data(groups, in_ch)
    ours = functools.partial(_ours, strides=strides, padding=padding, groups=groups)
    ref = functools.partial(_reference, strides=strides, padding=padding, groups=groups)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-6, atol=1e-6)
    for wrap in (lambda f: f, jax.jit):
      g_ours = wrap(jax.grad(functools.partial(_loss, ours), argnums=(0, 1)))(x, w)
      g_ref = jax.grad(functools.partial(_loss, ref), argnums=(0, 1))(x, w)
      for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(*CASES)
  def test_vmapped_grad_equals_each_member(self, strides, padding, groups, in_ch):
    x, w = self._data(groups, in_ch, members=K)
    ours = functools.partial(_ours, strides=strides, padding=padding, groups=groups)
    ref = functools.partial(_reference, strides=strides, padding=padding, groups=groups)
    grad_ours = jax.jit(jax.vmap(jax.grad(functools.partial(_loss, ours), argnums=(0, 1))))
    grad_ref = jax.grad(functools.partial(_loss, ref), argnums=(0, 1))
    got = grad_ours(x, w)
    for k in range(K):
      want = grad_ref(x[k], w[k])
      for a, b in zip(got, want):
        np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(ours)(x, w),
                               jnp.stack([ref(x[k], w[k]) for k in range(K)]),
                               rtol=1e-6, atol=1e-6)

  def test_vmap_over_both_operands_gives_dense_convolutions_on_cpu(self):
    if jax.default_backend() not in batching.UNROLL_BACKENDS:
      self.skipTest("members are unrolled on the CPU backend only")
    x, w = self._data(1, 4, members=K)
    ours = functools.partial(_ours, strides=(1, 1), padding="SAME", groups=1)
    ref = functools.partial(_reference, strides=(1, 1), padding="SAME", groups=1)
    step = jax.vmap(jax.grad(functools.partial(_loss, ours), argnums=(0, 1)))
    # Forward, input gradient and kernel gradient: one dense conv per member.
    self.assertEqual(_hlo_convs(step, x, w), [1] * (3 * K))
    # What vmap gives without it: grouped convolutions over the members.
    plain = jax.vmap(jax.grad(functools.partial(_loss, ref), argnums=(0, 1)))
    self.assertIn(K, _hlo_convs(plain, x, w))

  def test_shared_input_keeps_one_batched_convolution(self):
    x, w = self._data(1, 4, members=K)
    ours = functools.partial(_ours, strides=(1, 1), padding="SAME", groups=1)
    fwd = jax.vmap(ours, in_axes=(None, 0))
    self.assertEqual(_hlo_convs(fwd, x[0], w), [1])  # One, K x 8 features wide.
    got = fwd(x[0], w)
    for k in range(K):
      np.testing.assert_allclose(
          got[k], _reference(x[0], w[k], (1, 1), "SAME", 1), rtol=1e-6, atol=1e-6)

  def test_nested_vmap(self):
    x, w = self._data(1, 4, members=K)
    xs, ws = jnp.stack([x, x + 1.0]), jnp.stack([w, -w])  # [2, K, ...]
    ours = functools.partial(_ours, strides=(1, 1), padding="SAME", groups=1)
    g = jax.vmap(jax.vmap(jax.grad(functools.partial(_loss, ours), argnums=1)))(xs, ws)
    ref = jax.grad(functools.partial(
        _loss, functools.partial(_reference, strides=(1, 1), padding="SAME", groups=1)),
                   argnums=1)
    np.testing.assert_allclose(g[1, 2], ref(xs[1, 2], ws[1, 2]), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
