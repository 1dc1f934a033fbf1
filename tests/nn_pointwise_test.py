"""Tests for haqjax.nn.pointwise: 1x1 convolutions as matrix products.

Comparisons with `jax.lax.conv_general_dilated` allow float32 summation error
only: an output that sums `n` products is within `gamma_n * sum |products|` of
the exact sum in any order (Higham 2002, eq. 3.5), so two orders differ by at
most twice that, per element, with the magnitudes from the reference on
|operands|.
"""

import functools
import re
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from haqjax.nn import pointwise
from haqjax.nn.layers import QConv
from haqjax.policy import Policy
from haqjax.policy import SoftPolicy

U = 2.0 ** -24  # float32 unit roundoff.
K = 3  # vmapped members.


def _assert_within_summation_bound(got, want, magnitude, n_terms):
  """|got - want| <= 2 gamma_n |products| per element (+1% for the magnitudes' own rounding)."""
  got, want, magnitude = (np.asarray(a, np.float64) for a in (got, want, magnitude))
  bound = 2.02 * n_terms * U / (1 - n_terms * U) * magnitude
  excess = np.abs(got - want) - bound
  assert np.all(excess <= 0), (
      f"max |got - want| {np.max(np.abs(got - want)):.3g} exceeds the summation bound "
      f"(worst excess {np.max(excess):.3g})")


def _reference(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, window_strides=strides, padding=padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _ours(x, w, strides):
  return pointwise.pointwise_conv(x, w, window_strides=strides)


def _data(members=None, shape=(2, 7, 6, 5), out=4):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  lead = () if members is None else (members,)
  return (jax.random.normal(kx, lead + shape),
          jax.random.normal(kw, lead + (1, 1, shape[-1], out)) * 0.5, kg)


class PointwiseConvTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("same", (1, 1), "SAME"), ("valid_stride2", (2, 2), "VALID"),
      ("same_stride2", (2, 2), "SAME"), ("explicit_zero_stride_2_3", (2, 3), ((0, 0), (0, 0))))
  def test_value_and_grads_equal_lax(self, strides, padding):
    x, w, kg = _data()
    ref = functools.partial(_reference, strides=strides, padding=padding)
    want, ref_vjp = jax.vjp(ref, x, w)
    g = jax.random.normal(kg, want.shape)
    y_abs, abs_vjp = jax.vjp(ref, jnp.abs(x), jnp.abs(w))
    dx_mag, dw_mag = abs_vjp(jnp.abs(g))
    for wrap in (lambda f: f, jax.jit):
      got, our_vjp = wrap(lambda a, b: jax.vjp(functools.partial(_ours, strides=strides),
                                               a, b))(x, w)
      self.assertEqual(got.shape, want.shape)
      _assert_within_summation_bound(got, want, y_abs, x.shape[-1])
      (dx, dw), (dx_ref, dw_ref) = our_vjp(g), ref_vjp(g)
      _assert_within_summation_bound(dx, dx_ref, dx_mag, w.shape[-1])
      _assert_within_summation_bound(dw, dw_ref, dw_mag, np.prod(g.shape[:3]))

  @parameterized.named_parameters(
      ("both_operands", 0, 0), ("input_only", 0, None), ("kernel_only", None, 0))
  def test_vmapped_grads_equal_each_member(self, x_axis, w_axis):
    x, w, _ = _data(members=K)
    x = x if x_axis == 0 else x[0]
    w = w if w_axis == 0 else w[0]
    ours = functools.partial(_ours, strides=(2, 1))
    ref = functools.partial(_reference, strides=(2, 1), padding="VALID")
    grads = jax.jit(jax.vmap(jax.grad(lambda a, b: jnp.sum(ours(a, b) ** 2), (0, 1)),
                             in_axes=(x_axis, w_axis)))(x, w)
    for k in range(K):
      xk = x[k] if x_axis == 0 else x
      wk = w[k] if w_axis == 0 else w
      y, ref_vjp = jax.vjp(ref, xk, wk)
      dx, dw = ref_vjp(2 * y)
      y_abs, abs_vjp = jax.vjp(ref, jnp.abs(xk), jnp.abs(wk))
      # The cotangent 2y differs by the forward's error, at most 2 gamma_{C_in}
      # of its bound 2 (|x| * |w|), so each gradient is within
      # 2 gamma_{C_in + n} of its products taken with that bound.
      dx_mag, dw_mag = abs_vjp(2 * y_abs)
      c_in = xk.shape[-1]
      _assert_within_summation_bound(grads[0][k], dx, dx_mag, c_in + wk.shape[-1])
      _assert_within_summation_bound(grads[1][k], dw, dw_mag, c_in + np.prod(y.shape[:3]))

  def test_compiles_to_dots_only(self):
    x, w, _ = _data()
    step = jax.grad(lambda a, b: jnp.sum(_ours(a, b, (2, 2)) ** 2), (0, 1))
    text = jax.jit(step).lower(x, w).compile().as_text()
    self.assertNotIn("convolution(", text)

  def test_bad_kernel(self):
    x, _, _ = _data()
    with self.assertRaisesRegex(ValueError, r"allowed: \[1, 1, 5, out\]"):
      _ours(x, jnp.ones((3, 3, 5, 4)), (1, 1))

  def test_is_pointwise(self):
    self.assertTrue(pointwise.is_pointwise((1, 1, 8, 16), 1, "SAME"))
    self.assertTrue(pointwise.is_pointwise((1, 1, 8, 16), 1, ((0, 0), (0, 0))))
    self.assertFalse(pointwise.is_pointwise((1, 1, 8, 16), 1, ((1, 1), (0, 0))))
    self.assertFalse(pointwise.is_pointwise((3, 3, 8, 16), 1, "SAME"))
    self.assertFalse(pointwise.is_pointwise((1, 1, 4, 16), 2, "SAME"))


class _PointwiseNet(nn.Module):
  """One 1x1 QConv of stride 2, named `pw` in the policy."""

  @nn.compact
  def __call__(self, x, policy=None):
    return QConv(4, (1, 1), strides=2, padding=((0, 0), (0, 0)), name="pw")(x, policy)


def _hlo_convolutions(fn, *args) -> int:
  return len(re.findall(r" convolution\(", jax.jit(fn).lower(*args).compile().as_text()))


class QConvPointwiseTest(parameterized.TestCase):
  """The 1x1 QConv against the same layer on XLA's convolution."""

  def setUp(self):
    super().setUp()
    if jax.default_backend() not in pointwise.MATMUL_BACKENDS:
      self.skipTest("1x1 convolutions are matrix products on the CPU backend only")
    self.net = _PointwiseNet()
    self.x = jax.random.normal(jax.random.key(3), (2, 7, 7, 6))
    self.variables = self.net.init(jax.random.key(4), self.x)

  def _run(self, policy, matmul=True):
    backends = pointwise.MATMUL_BACKENDS if matmul else ()
    with mock.patch.object(pointwise, "MATMUL_BACKENDS", backends):
      def loss(params, x):
        y = self.net.apply({"params": params}, x, policy)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
      (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
          self.variables["params"], self.x)
    return y, grads

  def test_matmul_matches_convolution_under_every_policy(self):
    names = ("pw",)
    # As in tests/nn_depthwise_test.py: |Q(v)| <= 4/3 max|v| for min-max grids
    # of >= 2 bits and their mixtures; |cotangent| <= 1.
    x_max = 4 / 3 * float(jnp.max(jnp.abs(self.x)))
    w_max = 4 / 3 * float(jnp.max(jnp.abs(self.variables["params"]["pw"]["kernel"])))
    c_in, c_out, m = 6, 4, 2 * 4 * 4
    for label, policy in (
        ("float", None), ("w3a5", Policy.uniform(names, 3, 5)),
        ("soft", SoftPolicy.create(names, [[0.5, 0.5]], [[0.25, 0.75]], bits=(2, 8)))):
      with self.subTest(label):
        y, (d_params, dx) = self._run(policy)
        y_ref, (d_params_ref, dx_ref) = self._run(policy, matmul=False)
        _assert_within_summation_bound(y, y_ref, c_in * x_max * w_max, c_in)
        _assert_within_summation_bound(dx, dx_ref, c_out * w_max, c_out)
        _assert_within_summation_bound(d_params["pw"]["kernel"],
                                       d_params_ref["pw"]["kernel"], m * x_max, m)

  def test_cpu_compiles_no_convolution_and_other_backends_keep_it(self):
    params = self.variables["params"]

    def step(p, x):  # A new function for each call, so that each is traced anew.
      return jax.grad(lambda p: jnp.sum(self.net.apply({"params": p}, x) ** 2))(p)

    self.assertEqual(_hlo_convolutions(step, params, self.x), 0)
    with mock.patch.object(pointwise, "MATMUL_BACKENDS", ("gpu", "tpu")):
      self.assertGreater(_hlo_convolutions(lambda p, x: step(p, x), params, self.x), 0)


if __name__ == "__main__":
  absltest.main()
