"""STE, LSQ, LSQ+, PACT and HAQ's activation quantizer: values and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import quant
from haqjax.quant import affine
from haqjax.quant import learned


def test_ste_and_clipped_ste_gradients():
  x = jnp.linspace(-2.0, 2.0, 9)
  g = jax.grad(lambda x: jnp.sum(quant.ste(x, jnp.round(x)) * 3.0))(x)
  np.testing.assert_array_equal(g, 3.0)
  g = jax.grad(lambda x: jnp.sum(quant.clipped_ste(x, jnp.round(x), -1.0, 1.0)))(x)
  np.testing.assert_array_equal(g, (np.abs(np.asarray(x)) <= 1).astype(np.float32))
  np.testing.assert_array_equal(quant.clipped_ste(x, jnp.round(x), -1.0, 1.0), jnp.round(x))


def _np_lsq(x, s, bits, signed):
  qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
  v = x * np.float32(1.0 / s)
  out = np.round(np.clip(v, -qn, qp)) * s
  g = 1.0 / np.sqrt(x.size * qp)
  inside = (v > -qn) & (v < qp)
  ds = np.where(inside, -v + np.round(v), np.where(v <= -qn, -qn, qp))
  return out, g * ds.sum()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_forward_and_step_gradient_match_the_paper(bits, signed):
  x = np.random.default_rng(bits).normal(size=(64, 8)).astype(np.float32)
  if not signed:
    x = np.abs(x)
  s = np.float32(0.9 * 2 * np.abs(x).mean() / np.sqrt(2 ** (bits - 1)))
  fq = lambda s: learned.lsq_fake_quant(jnp.asarray(x), s, bits, signed=signed,
                                        num_elements=x.size)
  want, want_ds = _np_lsq(x, s, bits, signed)
  np.testing.assert_allclose(fq(jnp.float32(s)), want, rtol=1e-6, atol=1e-6)
  ds = jax.grad(lambda s: jnp.sum(fq(s)))(jnp.float32(s))
  np.testing.assert_allclose(ds, want_ds, rtol=1e-4, atol=1e-6)
  # The input gradient is 1 inside the clip range and 0 outside.
  dx = jax.grad(lambda x: jnp.sum(learned.lsq_fake_quant(
      x, jnp.float32(s), bits, signed=signed, num_elements=x.size)))(jnp.asarray(x))
  qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
  v = x * np.float32(1.0 / s)
  np.testing.assert_array_equal(dx, ((v >= -qn) & (v <= qp)).astype(np.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_a_step_carried_past_zero_keeps_quantizing_and_learning(signed):
  # An SGD step that carries s below zero (seen on a 3-bit classifier input)
  # must not freeze the quantizer at the floor with a constant output.
  x = np.abs(np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32))
  if signed:
    x = x - 0.5
  fq = lambda s: learned.lsq_fake_quant(jnp.asarray(x), s, 3, signed=signed,
                                        num_elements=x.size)
  np.testing.assert_allclose(fq(jnp.float32(-0.4)), fq(jnp.float32(0.4)))
  assert len(np.unique(np.asarray(fq(jnp.float32(-0.4))))) > 4
  loss = lambda s: jnp.sum((fq(s) - x) ** 2)
  assert float(jax.grad(loss)(jnp.float32(-0.4))) == pytest.approx(
      -float(jax.grad(loss)(jnp.float32(0.4))), rel=1e-6)
  clip = lambda a: jnp.sum(learned.pact_fake_quant(jnp.asarray(x), a, 3, signed=signed))
  np.testing.assert_allclose(clip(jnp.float32(-1.2)), clip(jnp.float32(1.2)))
  assert float(jax.grad(clip)(jnp.float32(-1.2))) != 0.0


def test_lsq_initialisation_and_binary_case():
  x = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
  q = quant.LSQ(sign="signed")
  params = q.calibrate(q.init(x), x, 4)
  np.testing.assert_allclose(params["step"], 2 * jnp.mean(jnp.abs(x)) / np.sqrt(7), rtol=1e-6)
  per_channel = quant.LSQ(sign="signed", channel_axis=-1)
  p = per_channel.calibrate(per_channel.init(x), x, 3)
  assert p["step"].shape == (1, 1, 1, 8)
  np.testing.assert_allclose(p["step"].ravel(),
                             2 * jnp.mean(jnp.abs(x), axis=(0, 1, 2)) / np.sqrt(3), rtol=1e-6)
  out = q(params, x, 1)  # Signed 1 bit: sign(x) * s.
  np.testing.assert_allclose(jnp.abs(out), params["step"], rtol=1e-6)
  np.testing.assert_array_equal(jnp.sign(out), jnp.where(x >= 0, 1.0, -1.0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_mse_initialisation_is_the_least_error_step_per_channel(bits):
  x = jax.random.laplace(jax.random.key(5), (3, 3, 16, 6))
  q = quant.LSQ(sign="signed", channel_axis=-1, step_init="mse")
  step = np.asarray(q.calibrate(q.init(x), x, bits)["step"]).ravel()
  xs = np.asarray(x).reshape(-1, 6)
  qn, qp = 2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
  half_span = (qp + qn) * (0.5 + 0.5 * affine.TIE_MARGIN)
  for c in range(6):  # Brute force over the candidate clips f * max|x|, f = k / 100.
    candidates = np.arange(100, 0, -1) / 100 * np.abs(xs[:, c]).max() / half_span
    errors = [np.mean((np.clip(np.round(xs[:, c] / s), -qn, qp) * s - xs[:, c]) ** 2)
              for s in candidates.astype(np.float32)]
    np.testing.assert_allclose(step[c], candidates[int(np.argmin(errors))], rtol=1e-5)
  paper = quant.LSQ(sign="signed", channel_axis=-1)
  mse = lambda qz: float(jnp.mean((qz(qz.calibrate(qz.init(x), x, bits), x, bits) - x) ** 2))
  assert mse(q) < mse(paper)


def test_lsq_mse_initialisation_picks_the_grid_traced_and_subsampled():
  relu = jax.nn.relu(jax.random.normal(jax.random.key(6), (32, 6, 6, 8)))
  q = quant.LSQ(sign="auto", batch_axis=0, step_init="mse")
  eager = q.calibrate(q.init(relu), relu, 2)
  traced = jax.jit(q.calibrate)(q.init(relu), relu, jnp.int32(2))
  chex.assert_trees_all_close(eager, traced)
  assert float(eager["signed"]) == 0.0
  codes = np.unique(np.round(np.asarray(q(eager, relu, 2)) / float(eager["step"])))
  np.testing.assert_array_equal(codes, [0, 1, 2, 3])  # all four unsigned levels used
  # Past `max_samples` values a per-tensor search scores a strided subset.
  small = quant.LSQ(sign="auto", batch_axis=0, step_init="mse", max_samples=512)
  sub = small.calibrate(small.init(relu), relu, 2)
  np.testing.assert_allclose(sub["step"], eager["step"], rtol=0.1)


def test_lsq_plus_offset_maps_the_range_onto_the_grid():
  x = jax.random.uniform(jax.random.key(1), (256,), minval=-0.5, maxval=3.5)
  q = quant.LSQ(sign="signed", learn_offset=True, batch_axis=0)
  params = q.calibrate(q.init(x), x, 3)
  out = np.asarray(q(params, x, 3))
  assert len(np.unique(out)) <= 8
  np.testing.assert_allclose(out.min(), float(jnp.min(x)), atol=1e-5)
  np.testing.assert_allclose(out.max(), float(jnp.max(x)), atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(q(p, x, 3) ** 2))(params)
  assert float(jnp.abs(grads["offset"])) > 0 and float(jnp.abs(grads["step"])) > 0


def test_pact_clip_gradient_is_the_count_above_the_clip():
  x = jnp.linspace(-1.0, 4.0, 51)
  alpha = jnp.float32(2.05)
  d_alpha = jax.grad(lambda a: jnp.sum(learned.pact_fake_quant(x, a, 4, signed=False)))(alpha)
  assert float(d_alpha) == float(jnp.sum(x >= alpha))
  dx = jax.grad(lambda x: jnp.sum(learned.pact_fake_quant(x, alpha, 4, signed=False)))(x)
  np.testing.assert_array_equal(dx, ((x > 0) & (x < alpha)).astype(np.float32))
  out = learned.pact_fake_quant(x, alpha, 2, signed=False)
  np.testing.assert_allclose(np.unique(np.asarray(out)), np.arange(4) * 2.05 / 3, rtol=1e-6)
  d_signed = jax.grad(lambda a: jnp.sum(learned.pact_fake_quant(x, a, 4, signed=True)))(
      jnp.float32(0.55))
  assert float(d_signed) == float(jnp.sum(x >= 0.55) - jnp.sum(x <= -0.55))


def test_haq_activation_is_unsigned_after_relu_signed_elsewhere():
  q = quant.HAQActivation()
  relu_out = jnp.abs(jax.random.normal(jax.random.key(2), (64,)))
  signed_in = jax.random.normal(jax.random.key(3), (64,))
  p_u = q.calibrate(q.init(relu_out), relu_out, 3)
  p_s = q.calibrate(q.init(signed_in), signed_in, 3)
  assert float(p_u["signed"]) == 0.0 and float(p_s["signed"]) == 1.0
  assert len(np.unique(np.asarray(q(p_u, relu_out, 3)))) <= 8
  signed_levels = np.unique(np.asarray(q(p_s, signed_in, 3)))
  assert len(signed_levels) <= 7 and signed_levels.min() < 0  # Narrow: 3 levels a side.
  assert float(q.init(relu_out)["clip"]) == 6.0


@pytest.mark.parametrize("quantizer", [quant.LSQ(sign="signed", channel_axis=-1),
                                       quant.LSQ(sign="auto", step_init="mse"),
                                       quant.LSQ(sign="auto", learn_offset=True),
                                       quant.PACT(sign="auto"), quant.HAQActivation(),
                                       quant.MinMaxWeight(), quant.MinMaxActivation(),
                                       quant.StaticRange(method="minmax")])
def test_one_trace_for_all_bits_and_vmap_equals_loop(quantizer):
  x = jax.random.normal(jax.random.key(4), (16, 8))
  params = quantizer.calibrate(quantizer.init(x), x, 4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def value_and_grad(params, bits):
    return jax.value_and_grad(lambda p, x: jnp.sum(quantizer(p, x, bits) ** 2),
                              argnums=(0, 1))(params, x)

  chex.clear_trace_counter()
  outs = [value_and_grad(params, jnp.int32(b)) for b in list(range(1, 9)) + [32]]
  batched = jax.jit(jax.vmap(value_and_grad, in_axes=(None, 0)))(
      params, jnp.asarray(list(range(1, 9)) + [32], jnp.int32))
  for i, (value, grads) in enumerate(outs):
    # Values are bit-exact; gradients are sums, which vmap may order differently.
    assert batched[0][i] == value
    chex.assert_trees_all_close(jax.tree.map(lambda b: b[i], batched[1]), grads,
                                rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jax.vmap(lambda b: quantizer(params, x, b))(
        jnp.asarray([i + 1]))[0], quantizer(params, x, i + 1))
  np.testing.assert_array_equal(quantizer(params, x, 32), x)


def test_bad_configs():
  with pytest.raises(ValueError, match="sign is 'both'"):
    quant.LSQ(sign="both")
  with pytest.raises(ValueError, match="step_init is 'max'; allowed: mean, mse"):
    quant.LSQ(step_init="max")
  with pytest.raises(ValueError, match="init_clip is -1"):
    quant.PACT(init_clip=-1)
  with pytest.raises(ValueError, match="estimator is 'soft'"):
    quant.MinMaxWeight(estimator="soft")
  with pytest.raises(ValueError, match="weight_quantizer is 'int4'; allowed: minmax"):
    quant.weight_quantizer("int4")
