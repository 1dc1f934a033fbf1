"""Tests of the quantizable layers: FP equivalence, call-time bits, traces."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.nn import QConv
from haqjax.nn import QDense
from haqjax.nn import layer_table
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy


class ToyNet(nn.Module):
  """conv -> depthwise -> dense, the three layer kinds."""

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    x = nn.relu(QConv(8, (3, 3), name="conv")(x, policy))
    x = nn.relu(QConv(8, (3, 3), strides=2, feature_group_count=8, name="dw")(x, policy))
    return QDense(10, name="fc")(x.mean((1, 2)), policy)


@pytest.fixture(scope="module")
def toy():
  model = ToyNet()
  x = jax.random.normal(jax.random.key(1), (4, 12, 12, 3))
  variables = model.init(jax.random.key(0), x)
  names = layer_table(model, x.shape).names
  return model, variables, x, names


@pytest.mark.parametrize("strides, padding, groups", [
    (1, "SAME", 1), (2, "SAME", 1), (2, "VALID", 1), (1, ((1, 0), (2, 1)), 1), (1, "SAME", 4)])
def test_qconv_matches_flax_conv_in_float(strides, padding, groups):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
  q = QConv(8, (3, 3), strides=strides, padding=padding, feature_group_count=groups,
            use_bias=True)
  v = q.init(jax.random.key(1), x)
  ref = nn.Conv(8, (3, 3), strides=strides, padding=padding,
                feature_group_count=groups).apply({"params": v["params"]}, x)
  np.testing.assert_allclose(q.apply(v, x), ref, rtol=1e-5, atol=1e-5)


def test_qdense_matches_flax_dense_in_float():
  x = jax.random.normal(jax.random.key(0), (5, 7))
  v = QDense(3).init(jax.random.key(1), x)
  np.testing.assert_allclose(QDense(3).apply(v, x), nn.Dense(3).apply(v, x), rtol=1e-6)


def test_bad_groups():
  with pytest.raises(ValueError, match="not divisible by groups=3"):
    QConv(8, (3, 3), feature_group_count=3).init(jax.random.key(0), jnp.ones((1, 4, 4, 4)))


def test_float_bits_equal_no_policy(toy):
  model, variables, x, names = toy
  full = Policy.uniform(names, FLOAT_BITS, FLOAT_BITS)
  np.testing.assert_allclose(model.apply(variables, x, full), model.apply(variables, x),
                             rtol=1e-6, atol=1e-6)


def test_fewer_bits_move_output_further(toy):
  model, variables, x, names = toy
  ref = model.apply(variables, x)
  errors = [float(jnp.abs(model.apply(variables, x, Policy.uniform(names, b, b)) - ref).mean())
            for b in (2, 4, 8)]
  assert errors[0] > errors[1] > errors[2] > 0


def test_each_layer_reads_its_own_bits(toy):
  model, variables, x, names = toy
  base = Policy.uniform(names, 8, 8)
  ref = model.apply(variables, x, base)
  for i in range(len(names)):
    w = np.full(len(names), 8)
    w[i] = 2
    out = model.apply(variables, x, Policy.create(names, w, 8))
    assert float(jnp.abs(out - ref).max()) > 1e-4, names[i]


def test_one_trace_for_100_policies(toy):
  model, variables, x, names = toy
  traces = []

  @jax.jit
  def loss(variables, x, policy):
    traces.append(1)
    return jnp.mean(model.apply(variables, x, policy) ** 2)

  rng = np.random.default_rng(0)
  for _ in range(100):
    p = Policy.create(names, rng.integers(1, 9, len(names)), rng.integers(1, 9, len(names)))
    loss(variables, x, p)
  assert len(traces) == 1

  grad_traces = []

  @jax.jit
  def grad(variables, x, policy):
    grad_traces.append(1)
    return jax.grad(lambda v: jnp.mean(model.apply(v, x, policy) ** 2))(variables)

  for _ in range(10):
    p = Policy.create(names, rng.integers(1, 9, len(names)), rng.integers(1, 9, len(names)))
    grad(variables, x, p)
  assert len(grad_traces) == 1


def _apply_with_operands(model, variables, x, policy):
  """Logits, and each layer's quantized input and kernel and its output."""
  operands = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = context.module.name
    if context.method_name == "_quantize":
      operands[f"{name}/input"], operands[f"{name}/kernel"] = out
    elif context.method_name == "__call__" and name is not None:
      operands[f"{name}/output"] = out
    return out

  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, x, policy)
  return logits, operands


def test_vmap_over_policies_equals_loop(toy):
  """Member k of a vmap over policies is the network under policy k.

  Everything up to the classifier but the depthwise output is bit-exact: the
  quantizers are elementwise, and a convolution sums as the unbatched one whether vmap
  runs it per member (both operands batched) or as one wider convolution
  (the input shared). XLA sums the spatial mean that feeds the classifier in
  another order in the batched program, so the classifier's input and the
  logits agree to float32 rounding only (bound below).
  """
  model, variables, x, names = toy
  rng = np.random.default_rng(1)
  w = rng.integers(1, 9, (6, len(names)))
  a = rng.integers(2, 9, (6, len(names)))
  run = jax.jit(functools.partial(_apply_with_operands, model, variables, x))
  batched, batched_operands = jax.jit(jax.vmap(run))(Policy.create(names, w, a))
  singles = [run(Policy.create(names, w[k], a[k])) for k in range(6)]
  assert set(batched_operands) == {f"{layer}/{part}" for layer in ("conv", "dw", "fc")
                                   for part in ("input", "kernel", "output")}
  tolerances = []
  for k, (single, operands) in enumerate(singles):
    for key, value in operands.items():
      if key == "dw/output":
        # On CPU the depthwise layer sums its 9 taps elementwise
        # (`haqjax.nn.depthwise`), and XLA may contract them into fused
        # multiply-adds in one program and not the other: within
        # 2 * 9 ulps of sum |x| |w| (Higham 2002, eq. 3.5).
        magnitude = jax.lax.conv_general_dilated(
            jnp.abs(operands["dw/input"]), jnp.abs(operands["dw/kernel"]), (2, 2),
            "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=operands["dw/input"].shape[-1])
        bound = 18 * 2.0 ** -24 * np.asarray(magnitude)
        assert np.all(np.abs(batched_operands[key][k] - value) <= bound), key
      elif not key.startswith("fc/") or key == "fc/kernel":
        np.testing.assert_array_equal(batched_operands[key][k], value, err_msg=key)
    # The mean of 36 non-negative terms summed in another order moves by at
    # most 2 * 35 ulps (2^-24 relative each); the classifier's quantizer maps
    # it to the same codes on a range moved likewise, and its 8-term dot
    # product adds at most 2 * 8 ulps of sum |w| |x|: each logit is within
    # 128 * 2^-24 * sum |w| |x| (a round-up of the ~90 these add to).
    magnitude = np.abs(operands["fc/input"]) @ np.abs(operands["fc/kernel"])  # [B, 10]
    tolerance = 128 * 2.0 ** -24 * magnitude
    assert np.all(np.abs(batched[k] - single) <= tolerance), k
    tolerances.append(tolerance.max())
  # Members mixed up would differ by far more than that.
  for k in range(6):
    for j in range(6):
      if j != k:
        assert float(jnp.abs(batched[k] - singles[j][0]).max()) > 1000 * max(tolerances)


def test_quantized_kernel_levels(toy):
  """At w bits, each output channel of the kernel takes at most 2^w values,
  the most negative code -2^(w-1) where the channel's extreme is negative."""
  model, variables, x, names = toy
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.module.name == "conv" and context.method_name == "_quantize":
      captured["kernel"] = next_fun(*args, **kwargs)[1]
      return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, Policy.uniform(names, 3, 8))
  k = np.asarray(captured["kernel"]).reshape(-1, 8)
  w = np.asarray(variables["params"]["conv"]["kernel"]).reshape(-1, 8)
  negative_extreme = 0
  for c in range(8):
    assert 2 <= len(np.unique(k[:, c])) <= 8
    codes = k[:, c] / (np.abs(w[:, c]).max() / 3.5)  # max|w| / (2^(w-1) - 1/2)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert -4 - 1e-4 <= codes.min() and codes.max() <= 3 + 1e-4
    if -w[:, c].min() > w[:, c].max():
      negative_extreme += 1
      np.testing.assert_allclose(codes.min(), -4, rtol=1e-5)
  assert negative_extreme > 0
