"""HAWQ sensitivities: layer traces against exact Hessians, errors, the table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from haqjax import models
from haqjax.hardware.budget import TABLE_BITS
from haqjax.hardware.budget import table_index
from haqjax.nn import layer_table
from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.quant.uniform import StaticRange
from haqjax.search.hawq import measure
from haqjax.search.hawq import sensitivity


class Tiny(nn.Module):
  """Two dense layers with a curved non-linearity between them."""

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    del train
    h = jnp.sin(2.0 * QDense(4, name="fc1")(x, policy))
    return QDense(3, name="fc2")(h, policy)


def tiny_problem():
  model = Tiny()
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  variables = model.init(k1, jnp.zeros((1, 3)))
  batches = [{"image": jax.random.normal(k, (4, 3)),
              "label": jax.random.randint(jax.random.fold_in(k, 1), (4,), 0, 3)}
             for k in jax.random.split(k2, 2)]
  return model, variables, batches


def exact_hessian_blocks(model, variables, batches):
  """Exact block traces of the mean Hessian, and the joint-probe variance per
  block and probe (independent probes per batch), per `(role, layer)`."""
  recorded = sensitivity.record(model, variables, batches)
  paths = {n: r["path"] for n, r in recorded.items()}
  x = {"kernel": {n: variables["params"][n]["kernel"] for n in paths},
       "input": {n: jnp.zeros((4, *recorded[n]["inputs"].shape[1:])) for n in paths}}
  flat, unravel = ravel_pytree(x)
  loss = sensitivity.layer_loss(model, variables, paths)
  # Index ranges of each leaf in the flat vector (ravel_pytree's leaf order).
  leaves, treedef = jax.tree.flatten(x)
  offsets = np.cumsum([0] + [l.size for l in leaves])
  slots = treedef.unflatten([slice(a, b) for a, b in zip(offsets[:-1], offsets[1:])])
  hessians = [np.asarray(jax.hessian(lambda f: loss(unravel(f), b))(flat), np.float64)
              for b in batches]
  out = {}
  for role in ("kernel", "input"):
    for name in paths:
      s = slots[role][name]
      var, trace = 0.0, 0.0
      for h in hessians:
        block = h[s, s]
        rest = np.delete(h[s], np.arange(flat.size)[s], axis=1)
        trace += np.trace(block) / len(hessians)
        var += (2 * (np.sum(block ** 2) - np.sum(np.diag(block) ** 2))
                + np.sum(rest ** 2)) / len(hessians) ** 2
      out[role, name] = trace, var
  return out


def test_layer_traces_match_the_exact_hessian():
  model, variables, batches = tiny_problem()
  exact = exact_hessian_blocks(model, variables, batches)
  probes, iterations = 64, 50
  traces = sensitivity.hessian_traces(jax.random.key(0), model, variables, batches,
                                      probes=probes, tol=0.0, max_iterations=iterations)
  assert traces.names == ("fc1", "fc2")
  assert traces.iterations == iterations and traces.probes == probes * iterations
  np.testing.assert_array_equal(traces.weight_count, [12, 12])
  np.testing.assert_array_equal(traces.activation_count, [12, 16])
  for role, got in (("kernel", traces.weight), ("input", traces.activation)):
    for i, name in enumerate(traces.names):
      trace, var = exact[role, name]
      sigma = np.sqrt(var / (probes * iterations))
      assert abs(got[i] - trace) < 5 * sigma, (role, name, got[i], trace, sigma)
      assert sigma < 0.1 * abs(trace)  # The comparison resolves each trace.


def test_quantization_errors_and_table():
  model, variables, batches = tiny_problem()
  recorded = sensitivity.record(model, variables, batches)
  w, a = sensitivity.quantization_mse(jax.random.key(0), variables, recorded,
                                      num_batches=2, w_bits=(2, 4, 8), a_bits=(4, 8))
  assert w.shape == a.shape == (2, len(TABLE_BITS))
  i = lambda b: int(table_index(b))
  for table, bits in ((w, (2, 4, 8)), (a, (4, 8))):
    assert np.all(table[:, i(32)] == 0)
    for b in TABLE_BITS:
      if b not in bits and b != 32:
        assert np.all(np.isinf(table[:, i(b)]))
    finite = [table[:, i(b)] for b in bits]
    assert all(np.all(f > 0) for f in finite)
    assert all(np.all(lo > hi) for lo, hi in zip(finite, finite[1:]))  # More bits, less error.
  # Min-max weights at 8 bits: a symmetric per-channel grid of step max|W| / 127,
  # uniform rounding noise of variance step^2 / 12 at most.
  kernel = np.asarray(variables["params"]["fc1"]["kernel"])
  step = np.abs(kernel).max(axis=0) / 127
  assert w[0, i(8)] <= np.mean(step ** 2) / 4
  traces = sensitivity.Traces(names=("fc1", "fc2"), weight=np.array([2.0, 0.0]),
                              activation=np.array([1.0, 3.0]), weight_count=np.ones(2),
                              activation_count=np.ones(2), iterations=1, probes=1,
                              converged=False, seconds=0.0)
  omega = sensitivity.perturbation_table(traces, w, a)
  assert omega.shape == (2, 9, 9)
  assert omega[0, i(4), i(8)] == pytest.approx(2 * w[0, i(4)] + a[0, i(8)])
  assert omega[1, i(2), i(4)] == pytest.approx(3 * a[1, i(4)])  # Zero trace: no inf * 0.
  assert omega[1, i(32), i(32)] == 0
  assert np.isinf(omega[0, i(3), i(8)]) and np.isinf(omega[1, i(8), i(2)])


def test_model_traces_in_layer_table_order():
  model = models.create("digits_cnn", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  key = jax.random.key(1)
  batches = [{"image": jax.random.normal(key, (16, 8, 8, 1)),
              "label": jnp.arange(16) % 10}]
  traces = sensitivity.hessian_traces(key, model, variables, batches, probes=2, tol=0.5,
                                      max_iterations=20)
  assert traces.names == layer_table(model, (1, 8, 8, 1)).names
  assert np.all(np.isfinite(traces.weight)) and np.all(np.isfinite(traces.activation))
  assert 2 <= traces.iterations <= 20
  np.testing.assert_array_equal(traces.activation_count, [16 * 64, 16 * 64 * 16, 16 * 32])


def test_bad_settings_are_one_line():
  model, variables, batches = tiny_problem()
  with pytest.raises(ValueError, match=r"max_iterations=0; allowed: >= 1"):
    sensitivity.hessian_traces(jax.random.key(0), model, variables, batches, probes=1,
                               tol=0.1, max_iterations=0)
  with pytest.raises(ValueError, match=r"tol=-1.0; allowed: >= 0"):
    sensitivity.hessian_traces(jax.random.key(0), model, variables, batches, probes=1,
                               tol=-1.0, max_iterations=1)


@pytest.mark.parametrize("name, shape", [("digits_cnn", (8, 8, 1)),
                                         ("quickstart_cnn", (28, 28, 1))])
def test_plain_convolutions_keep_the_outputs(name, shape):
  model = models.create(name, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (3, *shape))
  variables = model.init(jax.random.key(1), x)
  want = model.apply(variables, x, train=False)
  with nn.intercept_methods(sensitivity.plain_convolutions):
    got = model.apply(variables, x, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class Depthwise(nn.Module):
  """A convolution, a depthwise one (MobileNet's kind) and a classifier."""

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    del train
    x = jnp.tanh(QConv(4, (3, 3), name="conv")(x, policy))
    x = jnp.tanh(QConv(4, (3, 3), strides=2, feature_group_count=4, name="dw")(x, policy))
    return QDense(3, name="fc")(x.reshape(x.shape[0], -1), policy)


def test_depthwise_traces_with_weights_on_a_mesh():
  """Replicated weights and a sharded batch, as the jobs place them: JAX
  cannot batch a grouped convolution's kernel gradient over probes there, so
  depthwise layers run over their taps, with the outputs and the traces of
  unplaced weights."""
  from haqjax import parallel  # pylint: disable=g-import-not-at-top
  model = Depthwise()
  key = jax.random.key(2)
  x = jax.random.normal(key, (4, 6, 6, 1))
  variables = model.init(key, x)
  with nn.intercept_methods(sensitivity.plain_convolutions):
    np.testing.assert_allclose(model.apply(variables, x), model.apply(variables, x),
                               rtol=1e-6)
    got = model.apply(variables, x)
  np.testing.assert_allclose(got, model.apply(variables, x), rtol=1e-5, atol=1e-6)
  batches = [{"image": x, "label": jnp.arange(4) % 3}]
  mesh = parallel.data_mesh()
  placed = parallel.replicate(variables, mesh)
  on_mesh = [jax.device_put(b, parallel.batch_sharding(mesh)) for b in batches]
  kwargs = dict(probes=2, tol=0.0, max_iterations=2, curvature="gauss_newton")
  got = sensitivity.hessian_traces(key, model, placed, on_mesh, **kwargs)
  want = sensitivity.hessian_traces(key, model, variables, batches, **kwargs)
  assert got.names == ("conv", "dw", "fc")
  np.testing.assert_allclose(got.weight, want.weight, rtol=1e-4)
  np.testing.assert_allclose(got.activation, want.activation, rtol=1e-4)
  assert np.all(np.isfinite(got.weight)) and np.all(got.weight >= 0)


def test_measure_and_its_file_round_trip(tmp_path):
  model, variables, batches = tiny_problem()
  s = measure.sensitivity_pass(jax.random.key(0), model, variables, batches,
                               w_bits=(2, 4, 8),
                               a_bits=(4, 8), probes=4, tol=0.1, max_iterations=10)
  assert s.names == ("fc1", "fc2") and s.omega.shape == (2, 9, 9)
  i = lambda b: int(table_index(b))
  np.testing.assert_allclose(
      s.omega[:, i(4), i(8)], s.traces.weight * s.weight_mse[:, i(4)]
      + s.traces.activation * s.activation_mse[:, i(8)])
  path = tmp_path / "sensitivity.json"
  measure.write_sensitivity(path, s)
  text = path.read_text()
  assert "Infinity" not in text and "NaN" not in text  # Strict JSON: null.
  back = measure.read_sensitivity(path)
  np.testing.assert_array_equal(back.omega, s.omega)
  np.testing.assert_array_equal(back.traces.weight, s.traces.weight)
  assert (back.w_bits, back.a_bits, back.traces.probes) == ((2, 4, 8), (4, 8), s.traces.probes)


class TinyStatic(nn.Module):
  """`Tiny` with calibrated static input ranges (sign chosen from the data)."""

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    del train
    h = jnp.sin(2.0 * QDense(4, act_quantizer=StaticRange(), name="fc1")(x, policy))
    return QDense(3, act_quantizer=StaticRange(), name="fc2")(h, policy)


def test_errors_of_quantizers_that_calibrate_outside_jit():
  _, _, batches = tiny_problem()
  model = TinyStatic()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 3)))
  recorded = sensitivity.record(model, variables, batches)
  _, a = sensitivity.quantization_mse(jax.random.key(0), variables, recorded,
                                      num_batches=2, w_bits=(8,), a_bits=(2, 4, 8))
  i = lambda b: int(table_index(b))
  errors = a[:, [i(2), i(4), i(8)]]
  assert np.all(np.isfinite(errors)) and np.all(np.diff(errors, axis=1) < 0)
  # One static range over both batches: the error of a direct computation.
  x = jnp.asarray(recorded["fc2"]["inputs"])
  q = StaticRange()
  params = q.calibrate(q.init(x), x, jnp.int32(4))
  np.testing.assert_allclose(a[1, i(4)], float(jnp.mean((q(params, x, jnp.int32(4)) - x) ** 2)),
                             rtol=1e-5)
