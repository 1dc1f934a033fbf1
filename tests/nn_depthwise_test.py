"""Tests for haqjax.nn.depthwise: depthwise convolution as shifted multiply-adds.

Every comparison with `jax.lax.conv_general_dilated` allows float32 summation
error only: an output that sums `n` products is within `gamma_n * sum |products|`
of the exact sum in any summation order (Higham 2002, eq. 3.5), so two orders
differ by at most twice that. `_assert_within_summation_bound` checks this
per element, with the products' magnitudes computed by the same reference
on |operands|; a wrong tap, offset or stride gives errors of the order of
the values themselves.
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

from haqjax.nn import depthwise
from haqjax.nn.layers import QConv
from haqjax.policy import Policy
from haqjax.policy import SoftPolicy

U = 2.0 ** -24  # float32 unit roundoff.
K = 3  # vmapped members.


def _gamma(n: int) -> float:
  return n * U / (1 - n * U)


def _assert_within_summation_bound(got, want, magnitude, n_terms):
  """|got - want| <= 2 gamma_n |products| per element (+1% for the magnitudes' own rounding)."""
  got, want, magnitude = (np.asarray(a, np.float64) for a in (got, want, magnitude))
  bound = 2.02 * _gamma(n_terms) * magnitude
  excess = np.abs(got - want) - bound
  assert np.all(excess <= 0), (
      f"max |got - want| {np.max(np.abs(got - want)):.3g} exceeds the summation bound "
      f"(worst excess {np.max(excess):.3g})")


def _reference(x, w, strides, padding, dilation=(1, 1)):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _ours(x, w, strides, padding, dilation=(1, 1), materialize=False):
  return depthwise.depthwise_conv(x, w, window_strides=strides, padding=padding,
                                  rhs_dilation=dilation, materialize=materialize)


def _data(shape, kernel, multiplier=1, members=None, seed=0):
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  lead = () if members is None else (members,)
  x = jax.random.normal(kx, lead + shape)
  w = jax.random.normal(kw, lead + kernel + (1, shape[-1] * multiplier)) * 0.5
  return x, w, kg


# (name, input [N, H, W, C], kernel (kh, kw), strides, padding, dilation, multiplier)
CASES = (
    ("same_stride1", (2, 7, 6, 4), (3, 3), (1, 1), "SAME", (1, 1), 1),
    ("same_stride2", (2, 7, 6, 4), (3, 3), (2, 2), "SAME", (1, 1), 1),
    ("valid_stride1", (2, 7, 6, 4), (3, 3), (1, 1), "VALID", (1, 1), 1),
    ("valid_stride2", (2, 8, 9, 4), (3, 3), (2, 2), "VALID", (1, 1), 1),
    ("explicit_symmetric_stride2", (2, 8, 8, 4), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ("explicit_asymmetric", (2, 7, 6, 4), (3, 3), (2, 1), ((2, 0), (0, 3)), (1, 1), 1),
    ("explicit_negative", (2, 7, 6, 4), (3, 3), (1, 2), ((-1, 2), (1, 0)), (1, 1), 1),
    ("padding_wider_than_input", (1, 2, 3, 4), (3, 3), (1, 1), ((3, 3), (2, 2)), (1, 1), 1),
    ("kernel_2x3_stride3", (2, 7, 8, 4), (2, 3), (3, 2), "SAME", (1, 1), 1),
    ("kernel_5x5", (2, 9, 9, 3), (5, 5), (2, 2), "SAME", (1, 1), 1),
    ("dilated", (2, 9, 8, 4), (3, 3), (1, 1), "SAME", (2, 3), 1),
    ("dilated_stride2", (2, 9, 8, 4), (3, 3), (2, 2), ((2, 2), (1, 1)), (2, 1), 1),
    ("depth_multiplier", (2, 7, 6, 3), (3, 3), (2, 2), "SAME", (1, 1), 2),
)


class DepthwiseConvTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASES)
  def test_value_and_grads_equal_lax(self, shape, kernel, strides, padding, dilation,
                                     multiplier):
    x, w, kg = _data(shape, kernel, multiplier)
    ref = functools.partial(_reference, strides=strides, padding=padding,
                            dilation=dilation)
    want, ref_vjp = jax.vjp(ref, x, w)
    g = jax.random.normal(kg, want.shape)
    _, abs_vjp = jax.vjp(ref, jnp.abs(x), jnp.abs(w))
    dx_mag, dw_mag = abs_vjp(jnp.abs(g))
    n_out, n_in, n_w = kernel[0] * kernel[1], kernel[0] * kernel[1], np.prod(g.shape[:3])
    for wrap, materialize in ((lambda f: f, False), (jax.jit, False), (jax.jit, True)):
      ours = functools.partial(_ours, strides=strides, padding=padding, dilation=dilation,
                               materialize=materialize)
      got, our_vjp = wrap(lambda a, b: jax.vjp(ours, a, b))(x, w)
      self.assertEqual(got.shape, want.shape)
      _assert_within_summation_bound(got, want, ref(jnp.abs(x), jnp.abs(w)), n_out)
      (dx, dw), (dx_ref, dw_ref) = our_vjp(g), ref_vjp(g)
      _assert_within_summation_bound(dx, dx_ref, dx_mag, n_in * multiplier)
      _assert_within_summation_bound(dw, dw_ref, dw_mag, n_w)

  @parameterized.named_parameters(
      ("both_operands", 0, 0, False), ("input_only", 0, None, False),
      ("kernel_only", None, 0, False), ("both_materialized", 0, 0, True),
      ("kernel_only_materialized", None, 0, True))
  def test_vmapped_grads_equal_each_member(self, x_axis, w_axis, materialize):
    shape, kernel, strides, padding = (2, 7, 6, 4), (3, 3), (2, 2), "SAME"
    x, w, _ = _data(shape, kernel, members=K)
    x = x if x_axis == 0 else x[0]
    w = w if w_axis == 0 else w[0]
    ours = functools.partial(_ours, strides=strides, padding=padding, materialize=materialize)
    ref = functools.partial(_reference, strides=strides, padding=padding)
    ct = jnp.cos(jnp.arange(shape[-1]))  # [C] cotangent weights

    def loss(conv, a, b):
      return jnp.sum(conv(a, b) * ct)

    grads = jax.jit(jax.vmap(jax.value_and_grad(functools.partial(loss, ours), (0, 1)),
                             in_axes=(x_axis, w_axis)))(x, w)
    for k in range(K):
      xk = x[k] if x_axis == 0 else x
      wk = w[k] if w_axis == 0 else w
      value, (dx, dw) = jax.value_and_grad(functools.partial(loss, ref), (0, 1))(xk, wk)
      y_abs, abs_vjp = jax.vjp(ref, jnp.abs(xk), jnp.abs(wk))  # [N, Ho, Wo, C]
      _assert_within_summation_bound(grads[0][k], value, jnp.sum(y_abs * jnp.abs(ct)),
                                     9 * y_abs.size)
      dx_mag, dw_mag = abs_vjp(jnp.broadcast_to(jnp.abs(ct), y_abs.shape))
      _assert_within_summation_bound(grads[1][0][k], dx, dx_mag, 9)
      _assert_within_summation_bound(grads[1][1][k], dw, dw_mag, np.prod(y_abs.shape[:3]))

  def test_materialized_input_is_a_loop_operand(self):
    # The input (and, backward, the output gradient) reaches the taps through
    # a loop over batch slices, so XLA cannot fuse its producer into them;
    # the plain form is loop-free. A batch of one has nothing to split.
    x, w, _ = _data((4, 6, 6, 4), (3, 3))
    for materialize, loops in ((False, 0), (True, 2)):
      f = lambda a, b, m=materialize: jnp.sum(jnp.tanh(_ours(
          jnp.sin(a), b, (1, 1), "SAME", materialize=m)))
      hlo = jax.jit(jax.grad(f)).lower(x, w).as_text()
      self.assertEqual(hlo.count("stablehlo.while"), loops, materialize)
    hlo = jax.jit(lambda a, b: _ours(a, b, (1, 1), "SAME", materialize=True)).lower(
        x[:1], w).as_text()
    self.assertNotIn("stablehlo.while", hlo)

  def test_nested_vmap(self):
    x, w, _ = _data((2, 6, 6, 4), (3, 3), members=K)
    xs, ws = jnp.stack([x, x + 1.0]), jnp.stack([w, -w])  # [2, K, ...]
    ours = functools.partial(_ours, strides=(1, 1), padding="SAME")
    ref = functools.partial(_reference, strides=(1, 1), padding="SAME")
    got = jax.vmap(jax.vmap(ours))(xs, ws)
    _assert_within_summation_bound(got[1, 2], ref(xs[1, 2], ws[1, 2]),
                                   ref(jnp.abs(xs[1, 2]), jnp.abs(ws[1, 2])), 9)

  def test_compiles_to_no_convolution(self):
    x, w, _ = _data((2, 8, 8, 4), (3, 3))
    step = jax.grad(lambda a, b: jnp.sum(_ours(a, b, (2, 2), "SAME") ** 2), (0, 1))
    self.assertNotIn("convolution(", jax.jit(step).lower(x, w).compile().as_text())

  def test_autodiff_form_equals_the_custom_gradients_and_has_forward_mode(self):
    x, w, _ = _data((2, 7, 7, 4), (3, 3))
    conv = lambda a, b, custom: depthwise.depthwise_conv(
        a, b, window_strides=(2, 2), padding="SAME", custom_gradient=custom)
    loss = lambda a, b, custom: jnp.sum(jnp.sin(conv(a, b, custom)))
    for ours, theirs in zip(jax.grad(loss, (0, 1))(x, w, False),
                            jax.grad(loss, (0, 1))(x, w, True)):
      np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # Forward mode, which `jax.custom_vjp` does not allow.
    tangent = jnp.ones_like(w)
    got = jax.jvp(lambda b: conv(x, b, False), (w,), (tangent,))[1]
    np.testing.assert_allclose(got, conv(x, tangent, False), rtol=1e-5, atol=1e-5)
    with self.assertRaises(TypeError):
      jax.jvp(lambda b: conv(x, b, True), (w,), (tangent,))

  def test_bad_kernel(self):
    x, w, _ = _data((1, 4, 4, 4), (3, 3))
    with self.assertRaisesRegex(ValueError, r"allowed: \[kh, kw, 1, 4 \* m\]"):
      _ours(x, jnp.ones((3, 3, 2, 4)), (1, 1), "SAME")

  def test_is_depthwise(self):
    self.assertTrue(depthwise.is_depthwise((1, 8, 8, 4), (3, 3, 1, 4), 4))
    self.assertTrue(depthwise.is_depthwise((1, 8, 8, 4), (3, 3, 1, 8), 4))
    self.assertFalse(depthwise.is_depthwise((1, 8, 8, 4), (3, 3, 4, 8), 1))  # dense
    self.assertFalse(depthwise.is_depthwise((1, 8, 8, 4), (3, 3, 2, 8), 2))  # grouped
    self.assertFalse(depthwise.is_depthwise((1, 8, 8, 1), (3, 3, 1, 8), 1))  # one channel


def _hlo_group_counts(fn, *args) -> list[int]:
  """The feature_group_count of every convolution XLA compiles for `fn`."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return [int(m.group(1)) if (m := re.search(r"feature_group_count=(\d+)", l)) else 1
          for l in text.splitlines() if " convolution(" in l]


class _DepthwiseNet(nn.Module):
  """One depthwise QConv, named `dw` in the policy."""

  @nn.compact
  def __call__(self, x, policy=None):
    return QConv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=6,
                 name="dw")(x, policy)


class QConvDepthwiseTest(parameterized.TestCase):
  """The depthwise QConv against the same layer on XLA's grouped convolution."""

  def setUp(self):
    super().setUp()
    if jax.default_backend() not in depthwise.TAP_BACKENDS:
      self.skipTest("depthwise convolutions use the taps on the CPU backend only")
    self.layer = _DepthwiseNet()
    kx, kp = jax.random.split(jax.random.key(3))
    self.x = jax.random.normal(kx, (2, 9, 9, 6))
    self.variables = self.layer.init(kp, self.x)

  def _run(self, policy, x, params, taps=True):
    backends = depthwise.TAP_BACKENDS if taps else ()
    with mock.patch.object(depthwise, "TAP_BACKENDS", backends):
      def loss(params, x):
        y = self.layer.apply({"params": params}, x, policy)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
      (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    return y, grads

  def _policies(self):
    names = ("dw",)
    return (("float", None), ("w4a4", Policy.uniform(names, 4, 4)),
            ("w2a8", Policy.create(names, [2], [8])),
            ("soft", SoftPolicy.create(names, [[0.2, 0.3, 0.5]], [[0.6, 0.1, 0.3]],
                                       bits=(2, 4, 8))))

  def test_taps_match_grouped_convolution_under_every_policy(self):
    params = self.variables["params"]
    # Uniform bounds on the products: a min-max grid of b >= 2 bits ends within
    # half a step (a third of the range at 2 bits) of the operand's range, so
    # |Q(v)| <= 4/3 max|v|, and so are the mixtures of a SoftPolicy; 9
    # products per output and input gradient, batch x rows x columns per
    # kernel gradient.
    x_max = 4 / 3 * float(jnp.max(jnp.abs(self.x)))
    w_max = 4 / 3 * float(jnp.max(jnp.abs(params["dw"]["kernel"])))
    for label, policy in self._policies():
      with self.subTest(label):
        y, (d_params, dx) = self._run(policy, self.x, params)
        y_ref, (d_params_ref, dx_ref) = self._run(policy, self.x, params, taps=False)
        g_max = 1.0  # |cos| <= 1
        _assert_within_summation_bound(y, y_ref, 9 * x_max * w_max, 9)
        _assert_within_summation_bound(dx, dx_ref, 9 * g_max * w_max, 9)
        n_w = 2 * 5 * 5
        _assert_within_summation_bound(d_params["dw"]["kernel"],
                                       d_params_ref["dw"]["kernel"], n_w * x_max * g_max, n_w)
        if policy is not None:
          self.assertGreater(float(jnp.max(jnp.abs(y - self.layer.apply(
              self.variables, self.x)))), 1e-3)  # The policy quantized something.

  def test_vmapped_members_match_each_member(self):
    """The sweep path: K members, each with its own input, kernel and bits."""
    names = ("dw",)
    params = jax.vmap(lambda k: self.layer.init(k, self.x)["params"])(
        jax.random.split(jax.random.key(4), K))
    xs = jnp.stack([self.x, -self.x, 2 * self.x])
    policy = Policy.create(names, [[2], [4], [8]], [[8], [4], [3]])
    fn = lambda p, x, pol: self.layer.apply({"params": p}, x, pol)
    got = jax.jit(jax.vmap(fn))(params, xs, policy)
    with mock.patch.object(depthwise, "TAP_BACKENDS", ()):
      want = [fn(jax.tree.map(lambda a: a[k], params), xs[k],
                 Policy.create(names, policy.w_bits[k], policy.a_bits[k]))
              for k in range(K)]
    for k in range(K):
      bound = 9 * (4 / 3) ** 2 * float(jnp.max(jnp.abs(xs[k]))) * float(
          jnp.max(jnp.abs(params["dw"]["kernel"][k])))  # As in the test above.
      _assert_within_summation_bound(got[k], want[k], bound, 9)

  def test_cpu_compiles_no_grouped_convolution_and_other_backends_keep_it(self):
    params = self.variables["params"]

    def step(p, x):  # A new function for each call, so that each is traced anew.
      return jax.grad(lambda p: jnp.sum(self.layer.apply({"params": p}, x) ** 2))(p)

    self.assertEqual(_hlo_group_counts(step, params, self.x), [])
    with mock.patch.object(depthwise, "TAP_BACKENDS", ("gpu", "tpu")):
      self.assertIn(6, _hlo_group_counts(lambda p, x: step(p, x), params, self.x))


if __name__ == "__main__":
  absltest.main()
