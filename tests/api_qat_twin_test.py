"""QAT of a plain-flax ResNet through `haqjax.finetune` equals its haqjax twin's.

The user's ResNet (`nn.Conv`, `nn.BatchNorm`, residual adds; the module of
`nn_intercept_resnet_test`) and `haqjax.models.resnet_small`, with the same
variables, are calibrated and fine-tuned under one mixed policy on the same
numpy arrays: the trained parameters, BatchNorm statistics and test scores
agree to float32 rounding (the two run the same arithmetic in other
programs), and training moved them (the comparison is not of untouched
variables).
"""

import jax
import numpy as np
import pytest

import haqjax
from haqjax import models
from haqjax.nn import layer_table
from haqjax.nn import pointwise
from haqjax.policy import Policy
from haqjax.quant import MinMaxWeight
from haqjax.quant import QuantScheme
from haqjax.quant import StaticRange
from nn_intercept_resnet_test import ResNet
from nn_intercept_testing import random_variables
from nn_intercept_testing import strip_quantizers

SCHEME = QuantScheme(weight=MinMaxWeight(), act=StaticRange())
SHAPE = (1, 8, 8, 3)


def _data(n, seed):
  """Ten classes told apart by a per-class colour offset: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, n)
  means = np.random.default_rng(99).normal(size=(10, 1, 1, 3))
  x = means[y] + 0.5 * rng.standard_normal((n, 8, 8, 3))
  return x.astype(np.float32), y


@pytest.fixture(autouse=True)
def xla_convolutions(monkeypatch):
  """The haqjax layers run 1x1 convolutions as XLA's, as flax's nn.Conv does."""
  monkeypatch.setattr(pointwise, "MATMUL_BACKENDS", ())


def test_qat_of_the_plain_resnet_equals_the_haqjax_twin_s():
  haq = models.resnet_small(depth=8, width_mult=0.5).clone(quant_scheme=SCHEME)
  x, y = _data(128, 0)
  xt, yt = _data(128, 1)
  variables = random_variables(haq, x[:4])
  plain, plain_vars = haqjax.quantize(ResNet(), strip_quantizers(variables), SHAPE,
                                      quant_scheme=SCHEME)
  names = layer_table(haq, SHAPE).names
  assert layer_table(plain, SHAPE).names == names
  rng = np.random.default_rng(2)
  policy = Policy.create(names, rng.integers(3, 9, len(names)), rng.integers(4, 9, len(names)))
  kwargs = dict(epochs=1.0, learning_rate=0.05, batch_size=64, seed=3)
  want = haqjax.finetune(haq, variables, (x, y), policy, **kwargs)
  got = haqjax.finetune(plain, plain_vars, (x, y), policy, **kwargs)
  leaves = lambda v: jax.tree.leaves_with_path(jax.tree.map(np.asarray, v))
  pairs = list(zip(leaves(got), leaves(want)))
  assert len(pairs) == len(leaves(want)) == len(leaves(got))
  moved = 0
  for ((path, g), (_, w)), (_, start) in zip(pairs, leaves(variables)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    moved += not np.allclose(w, start)
  # Training changed the kernels and statistics of every layer, not a few leaves.
  assert moved >= 2 * len(names), moved
  scores = [haqjax.evaluate(m, v, (xt, yt), policy, integer=False)
            for m, v in ((haq, want), (plain, got))]
  assert abs(scores[0]["loss"] - scores[1]["loss"]) <= 1e-4 * max(1.0, scores[0]["loss"])
  assert scores[0]["top1"] == scores[1]["top1"]
