"""haqjax.ptq.ptq and BN folding on a flax NNX CNN: its linen twin's results."""

import jax
import jax.numpy as jnp
import numpy as np

from haqjax.nn import conv_bn_pairs
from haqjax.nn import nnx_quantized
from haqjax.nn import nnx_update
from haqjax.nn import nnx_variables
from haqjax.nn import quantized
from haqjax.policy import Policy
from haqjax.ptq import PTQOptions
from haqjax.ptq import folding
from haqjax.ptq import ptq
from haqjax.ptq import wrapped
from api_nnx_test import SHAPE
from api_nnx_test import LinenCNN
from api_nnx_test import nnx_cnn

NAMES = ("conv1", "dw", "head")


def test_bn_pairs_are_found_in_the_nnx_model():
  model = nnx_cnn()
  variables = nnx_variables(model)
  shape = (2, *SHAPE)
  found = conv_bn_pairs(nnx_quantized(model), variables, shape)
  assert found == conv_bn_pairs(quantized(LinenCNN()), variables, shape)
  assert [(p.path, p.bn_path) for p in found] == [(("conv1",), ("bn1",))]
  pairs = folding.traced_bn_pairs(nnx_quantized(model), variables, shape)
  assert pairs == (folding.BNPair("conv1", ("conv1",), ("bn1",)),)
  # The CLE pairs by data flow, NNX's as linen's: conv1 -> bn1 -> relu -> dw -> relu
  # -> mean -> head.
  eq_pairs = wrapped.equalization_pairs(nnx_quantized(model), variables, shape, pairs)
  assert eq_pairs == wrapped.equalization_pairs(quantized(LinenCNN()), variables, shape,
                                                pairs)
  assert [tuple(p) for p in eq_pairs] == [("conv1", "dw", "relu"), ("dw", "head", "relu")]
  x = jnp.zeros(shape)
  assert list(wrapped.layer_geometries(nnx_quantized(model), variables, x)) == list(NAMES)


def test_w8a8_equals_the_linen_twin_s():
  """Same variables, data and options: the same folded and AdaRounded network."""
  model, linen = nnx_cnn(), LinenCNN()
  variables = nnx_variables(model)
  images = jnp.asarray(np.random.default_rng(3).normal(size=(32, *SHAPE)), jnp.float32)
  calibration = [{"image": images[:16]}, {"image": images[16:]}]
  policy = Policy.uniform(NAMES, 8, 8)
  options = PTQOptions(cle=False, adaround=True, adaround_iters=20,
                       weight_range="minmax", act_range="minmax")
  key = jax.random.key(0)
  want = ptq(key, linen, variables, calibration, policy, options)
  got = ptq(key, model, None, calibration, policy, options)
  assert got.report["bn_pairs"] == want.report["bn_pairs"] == [["conv1", "bn1"]]
  assert set(got.report["adaround_layer_seconds"]) == set(NAMES)
  assert jax.tree.structure(got.variables) == jax.tree.structure(want.variables)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got.variables),
                               jax.tree_util.tree_leaves_with_path(want.variables)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  logits = got.model.apply(got.variables, images, policy=policy, train=False)
  np.testing.assert_allclose(
      logits, want.model.apply(want.variables, images, policy=policy, train=False),
      rtol=1e-4, atol=1e-4)
  fp32 = model(images)
  assert np.abs(np.asarray(logits) - np.asarray(fp32)).max() > 1e-4  # quantized
  # The folded BN is the identity: the NNX model runs the folded network.
  folded = nnx_update(nnx_cnn(), got.variables)
  np.testing.assert_array_equal(nnx_variables(folded)["batch_stats"]["bn1"]["mean"], 0)
  np.testing.assert_allclose(folded(images), got.model.apply(
      got.variables, images, policy=None, train=False), rtol=1e-5, atol=1e-5)
