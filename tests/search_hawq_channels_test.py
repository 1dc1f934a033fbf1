"""HAWQ's sensitivity per channel: channel traces, channel errors, a dead channel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.hardware.budget import table_index
from haqjax.nn.layers import QDense
from haqjax.search.hawq import errors
from haqjax.search.hawq import gauss_newton
from haqjax.search.hawq import hutchinson
from haqjax.search.hawq import measure
from haqjax.search.hawq import sensitivity
from haqjax.search.hawq.config import HawqConfig


def test_hutchinson_channel_traces_of_a_diagonal_hessian_are_exact():
  # loss = sum d * x^2 / 2: a diagonal Hessian, so every probe's v_i (Hv)_i = d_i.
  d = {"conv": jnp.arange(1.0, 1.0 + 2 * 3 * 3 * 4).reshape(2, 3, 3, 4),
       "dense": jnp.linspace(0.5, 3.0, 15).reshape(5, 3), "vector": jnp.array([2.0, 5.0])}
  x = jax.tree.map(jnp.ones_like, d)
  loss = lambda p, batch: sum(jnp.sum(a * b ** 2) / 2 for a, b in
                              zip(jax.tree.leaves(d), jax.tree.leaves(p)))
  out = hutchinson.estimator(loss, probes=3, channels=True)(
      jax.random.key(0), x, [None, None], tol=0.0, max_iterations=2)
  for name, diag in d.items():
    diag = np.asarray(diag, np.float64)
    want = diag.reshape(-1, diag.shape[-1]).sum(0) if diag.ndim >= 2 else [diag.sum()]
    np.testing.assert_allclose(out.channel_traces[name], want, rtol=1e-5)
    assert out.traces[name] == pytest.approx(float(np.sum(want)), rel=1e-5)
  plain = hutchinson.estimator(loss, probes=3)(jax.random.key(0), x, [None, None],
                                               tol=0.0, max_iterations=2)
  assert plain.channel_traces is None
  assert plain.traces == pytest.approx(out.traces)


class TwoDense(nn.Module):
  """Two dense layers with a ReLU between them (`dead_channel_problem` kills
  fc1's first output and has fc2 amplify that channel 1000 times, as a
  BatchNorm of zero running variance does)."""

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    del train
    h = nn.relu(QDense(4, name="fc1")(x, policy))
    return QDense(3, name="fc2")(h, policy)


def test_gauss_newton_channel_traces_match_the_exact_matrix():
  model = TwoDense()
  variables = model.init(jax.random.key(1), jnp.zeros((1, 3)))
  batch = {"image": jax.random.normal(jax.random.key(2), (6, 3)),
           "label": jnp.zeros((6,), jnp.int32)}
  x = variables["params"]["fc1"]["kernel"]  # [3, 4]: 4 output channels.
  logits = lambda k, b: model.apply(
      {"params": {**variables["params"], "fc1": {**variables["params"]["fc1"], "kernel": k}}},
      b["image"])
  out = gauss_newton.estimator(logits, probes=64, channels=True)(
      jax.random.key(3), x, [batch], tol=0.0, max_iterations=40)
  jac = jax.jacrev(lambda k: logits(k, batch))(x).reshape(6, 3, -1)  # [B, classes, 12]
  p = jax.nn.softmax(logits(x, batch))
  diag = np.zeros(x.size)
  for n in range(6):
    h = (jnp.diag(p[n]) - jnp.outer(p[n], p[n])) / 6
    diag += np.diag(np.asarray(jac[n].T @ h @ jac[n]))
  want = diag.reshape(x.shape).sum(0)
  np.testing.assert_allclose(out.channel_traces, want, rtol=0.1)
  assert out.traces == pytest.approx(float(np.sum(out.channel_traces)), rel=1e-5)


def test_channel_errors_average_to_the_tensor_errors():
  model = TwoDense()
  variables = model.init(jax.random.key(1), jnp.zeros((1, 3)))
  batches = [{"image": jax.random.normal(k, (4, 3)), "label": jnp.zeros((4,), jnp.int32)}
             for k in jax.random.split(jax.random.key(2), 2)]
  recorded = sensitivity.record(model, variables, batches)
  kwargs = dict(num_batches=2, w_bits=(2, 4, 8), a_bits=(3, 8))
  w, a = errors.quantization_mse(jax.random.key(0), variables, recorded, **kwargs)
  wc, ac = errors.quantization_mse(jax.random.key(0), variables, recorded, channels=True,
                                   **kwargs)
  assert [t.shape for t in wc] == [(9, 4), (9, 3)] and [t.shape for t in ac] == [(9, 3),
                                                                              (9, 4)]
  for tensor, channels in ((w, wc), (a, ac)):
    for l, table in enumerate(channels):
      finite = np.isfinite(tensor[l])
      np.testing.assert_array_equal(np.all(np.isfinite(table), axis=1), finite)
      np.testing.assert_allclose(table[finite].mean(axis=1), tensor[l][finite], rtol=1e-5)
      # Equal channel traces weight the channels equally: the tensor's error again.
      np.testing.assert_allclose(errors.channel_weighted([table], [np.full(table.shape[1], 7.0)])[0],
                                 tensor[l], rtol=1e-5)


def test_channel_weighted_by_hand():
  inf = np.inf
  table = np.array([[inf, inf]] + [[1.0, 3.0]] * 7 + [[0.0, 0.0]])  # [9, 2]
  got = errors.channel_weighted([table, table], [np.array([3.0, 1.0]), np.array([0.0, 0.0])])
  assert np.isinf(got[0, 0]) and got[0, -1] == 0
  assert got[0, 1] == pytest.approx((3 * 1 + 1 * 3) / 4)
  assert got[1, 1] == pytest.approx(2.0)  # No curvature at all: the plain mean.


def dead_channel_problem():
  model = TwoDense()
  variables = model.init(jax.random.key(4), jnp.zeros((1, 3)))
  params = jax.tree.map(lambda a: a, variables["params"])
  params["fc1"]["kernel"] = params["fc1"]["kernel"].at[:, 0].set(0.0)
  params["fc1"]["bias"] = params["fc1"]["bias"].at[0].set(-1.0)
  params["fc2"]["kernel"] = params["fc2"]["kernel"].at[0].set(jnp.array([1e3, -1e3, 0.0]))
  batches = [{"image": jax.random.normal(k, (16, 3)),
              "label": jax.random.randint(jax.random.fold_in(k, 1), (16,), 0, 3)}
             for k in jax.random.split(jax.random.key(5), 2)]
  return model, {**variables, "params": params}, batches


def test_a_dead_channel_adds_curvature_but_no_error_per_channel():
  model, variables, batches = dead_channel_problem()
  kwargs = dict(w_bits=(2, 4, 8), a_bits=(2, 4, 8), probes=16, tol=0.0, max_iterations=8,
                curvature="gauss_newton")
  tensor = measure.sensitivity_pass(jax.random.key(0), model, variables, batches,
                                    granularity="tensor", **kwargs)
  channel = measure.sensitivity_pass(jax.random.key(0), model, variables, batches, **kwargs)
  assert tensor.granularity == "tensor" and channel.granularity == "channel"
  i = lambda b: int(table_index(b))
  traces = channel.traces.activation_channels[1]  # fc2's input, [4]
  assert traces[0] > 1e4 * traces[1:].max()  # The dead channel holds the curvature...
  recorded = sensitivity.record(model, variables, batches)
  _, per_channel = errors.quantization_mse(jax.random.key(0), variables, recorded,
                                           num_batches=2, w_bits=(8,), a_bits=(4,),
                                           channels=True)
  assert per_channel[1][i(4), 0] == 0  # ...and no error: zero is on the grid.
  assert per_channel[1][i(4), 1:].min() > 0
  want = float(traces @ per_channel[1][i(4)])
  got = channel.omega[1, i(32), i(4)]
  assert got == pytest.approx(want, rel=1e-4)
  assert got < 1e-3 * tensor.omega[1, i(32), i(4)]
  # The traces per tensor are the sums of the channels' (one estimator run).
  np.testing.assert_allclose(channel.traces.activation,
                             [c.sum() for c in channel.traces.activation_channels], rtol=1e-5)
  np.testing.assert_allclose(channel.traces.activation, tensor.traces.activation, rtol=1e-5)
  # Weights without such a channel: the same order of magnitude either way.
  ratio = channel.omega[:, i(4), i(32)] / tensor.omega[:, i(4), i(32)]
  assert np.all((ratio > 0.2) & (ratio < 5))


def test_channel_pass_round_trips_through_its_file(tmp_path):
  model, variables, batches = dead_channel_problem()
  done = measure.sensitivity_pass(jax.random.key(0), model, variables, batches,
                                  w_bits=(4, 8), a_bits=(4, 8), probes=2, tol=0.0,
                                  max_iterations=1, curvature="gauss_newton",
                                  granularity="channel")
  path = tmp_path / "sensitivity.json"
  measure.write_sensitivity(path, done)
  back = measure.read_sensitivity(path)
  assert back.granularity == "channel"
  for a, b in zip(back.traces.activation_channels, done.traces.activation_channels):
    np.testing.assert_allclose(a, b)
  np.testing.assert_allclose(np.nan_to_num(back.omega, posinf=-1),
                             np.nan_to_num(done.omega, posinf=-1))


def test_bad_granularity_is_one_line():
  with pytest.raises(ValueError, match=r"^hawq_granularity='layer' is not allowed; "
                                       r"allowed: channel, tensor$"):
    HawqConfig(hawq_granularity="layer")
  model, variables, batches = dead_channel_problem()
  with pytest.raises(ValueError, match=r"^granularity='layer'; allowed: channel, tensor$"):
    measure.sensitivity_pass(jax.random.key(0), model, variables, batches, w_bits=(8,),
                             a_bits=(8,), probes=2, tol=0.0, max_iterations=1,
                             granularity="layer")
