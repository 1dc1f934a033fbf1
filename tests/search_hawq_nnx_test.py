"""HAWQ (`method='hawq'`) on a flax NNX model: its linen twin's traces and policy."""

import jax
import jax.numpy as jnp
import numpy as np

import haqjax
from haqjax.nn import nnx_quantized
from haqjax.nn import nnx_variables
from haqjax.nn import quantized
from haqjax.search.hawq import sensitivity
from haqjax.search.hawq.config import HawqConfig
from api_nnx_test import LinenCNN
from api_nnx_test import arrays
from api_nnx_test import nnx_cnn

HAWQ = HawqConfig(hawq_bits="2,4,8", hawq_probes=2, hawq_max_iterations=1,
                  hawq_batches=1)


def test_hessian_traces_equal_the_linen_twin_s():
  model = nnx_cnn()
  variables = nnx_variables(model)
  x, y = arrays(8, 2)
  batches = [{"image": jnp.asarray(x), "label": jnp.asarray(y)}]
  run = lambda m: sensitivity.hessian_traces(
      jax.random.key(0), m, haqjax.nn.init_quantizers(m, variables, x[:1]), batches,
      probes=2, tol=0.0, max_iterations=1)
  want, got = run(quantized(LinenCNN())), run(nnx_quantized(model))
  assert got.names == want.names == ("conv1", "dw", "head")
  np.testing.assert_array_equal(got.weight_count, want.weight_count)
  np.testing.assert_allclose(got.weight, want.weight, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.activation, want.activation, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(want.weight) != 0)


def test_search_policy_hawq_on_an_nnx_model_is_the_linen_twin_s():
  model = nnx_cnn()
  variables = nnx_variables(model)
  kwargs = dict(method="hawq", hawq=HAWQ, budget="w4a4", target="bitfusion",
                metric="energy", batch_size=16, eval_batch_size=16, finetune_epochs=0)
  train, val = arrays(32, 0), arrays(16, 1)
  got = haqjax.search_policy(model, None, train, val, **kwargs)
  want = haqjax.search_policy(LinenCNN(), variables, train, val, **kwargs)
  assert got.table.rows() == want.table.rows()
  for role in ("weight_traces", "activation_traces"):
    traces = np.asarray(got.search[role])
    assert traces.shape == (3,) and np.any(traces != 0)
    np.testing.assert_allclose(traces, want.search[role], rtol=1e-5, atol=1e-7)
  assert got.policy.names == want.policy.names
  np.testing.assert_array_equal(got.policy.w_bits, want.policy.w_bits)
  np.testing.assert_array_equal(got.policy.a_bits, want.policy.a_bits)
  assert got.fits and got.cost == want.cost
  assert got.quantized["val_top1"] == want.quantized["val_top1"]
