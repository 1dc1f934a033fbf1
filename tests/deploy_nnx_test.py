"""The integer model of a flax NNX CNN is its linen twin's.

`haqjax.quantize` converts the NNX model (`nnx.Conv`, `nnx.BatchNorm`,
`nnx.Linear`) to a linen module whose layers run in scopes at their
attribute paths; `haqjax.deploy` lowers those layers as the twin's `nn.Conv`
/ `nn.BatchNorm` / `nn.Dense`. With the same weights the float models are
bit for bit the same, so are the calibrated ranges, and the lowering reads
only those arrays and the layers' geometry: the two graphs have the same
nodes and give the same integer logits, bit for bit.
"""

from flax import nnx
import numpy as np
import pytest

import haqjax
from haqjax.deploy import agreement
from haqjax.deploy import build
from haqjax.deploy import engine
from haqjax.nn import nnx_variables
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy
from api_nnx_test import LinenCNN
from api_nnx_test import arrays
from api_nnx_test import nnx_cnn

NAMES = ("conv1", "dw", "head")
POLICIES = {
    "w8a8": Policy.uniform(NAMES, 8, 8),
    # Low and mixed bits, and a float classifier (dequantized input).
    "mixed": Policy.create(NAMES, np.array([8, 4, FLOAT_BITS]), np.array([6, 4, FLOAT_BITS])),
}


@pytest.fixture(scope="module")
def twins():
  model = nnx_cnn()
  x, y = arrays(48, 0)
  nnx_q = haqjax.quantize(model, None, x[:1])
  linen_q = haqjax.quantize(LinenCNN(), nnx_variables(model), x[:1])
  return model, nnx_q, linen_q, (x, y)


@pytest.mark.parametrize("label", sorted(POLICIES))
def test_nnx_cnn_lowers_to_its_linen_twin_s_integer_model(twins, label):
  model, nnx_q, linen_q, (x, y) = twins
  policy = POLICIES[label]
  graphs, logits = [], []
  for qmodel, qvars in (nnx_q, linen_q):
    calibrated = haqjax.calibrate(qmodel, qvars, (x, y), policy, batch_size=16)
    graph = build.build(qmodel, calibrated, policy, x[:1])
    graphs.append(graph)
    logits.append(np.asarray(engine.run(graph, x)))
    # Predictions agree with the fake-quantized model's but for near ties.
    theirs = np.asarray(agreement.fake_quant_run(qmodel, calibrated, x, policy)[0])
    diff = float(np.max(np.abs(logits[-1] - theirs)))
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    near_ties = int(np.sum(top2[:, 1] - top2[:, 0] <= 2 * diff))
    assert np.sum(np.argmax(logits[-1], -1) != np.argmax(theirs, -1)) <= near_ties
  got, want = graphs
  assert got.layers() == want.layers() == NAMES
  assert [(n.name, n.op) for n in got.nodes] == [(n.name, n.op) for n in want.nodes]
  # The BatchNorm folded into conv1 (no node of its own), as in the twin.
  assert not any(n.name.startswith("bn1") for n in got.nodes)
  np.testing.assert_array_equal(logits[0], logits[1])
  # The NNX model itself is unchanged by the conversion and lowering.
  assert isinstance(model.conv1, nnx.Conv) and model.bn1.use_running_average


def test_evaluate_reports_the_same_integer_top1_for_both(twins):
  model, _, linen_q, (x, y) = twins
  policy = POLICIES["mixed"]
  nnx_vars = haqjax.calibrate(model, None, (x, y), policy, batch_size=16)
  linen_vars = haqjax.calibrate(linen_q[0], linen_q[1], (x, y), policy, batch_size=16)
  got = haqjax.evaluate(model, nnx_vars, (x, y), policy, batch_size=16)
  want = haqjax.evaluate(linen_q[0], linen_vars, (x, y), policy, batch_size=16)
  assert got["integer_top1"] is not None
  assert got == want


class NnxNormed(nnx.Module):
  """A conv then a layer norm: an op the integer graph has no node for."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(self.conv(x)).mean((1, 2)))


def test_an_op_without_a_node_is_named_by_its_nnx_path():
  model = NnxNormed(nnx.Rngs(0))
  x, _ = arrays(2, 0)
  qmodel, qvars = haqjax.quantize(model, None, x[:1])
  policy = Policy.uniform(("conv", "head"), 8, 8)
  with pytest.raises(ValueError, match=r"^deploy: 'norm' uses \w+; allowed ops"):
    build.build(qmodel, qvars, policy, x[:1])


def test_an_nnx_batch_norm_before_its_conv_is_named():
  """A BN that does not follow a layer has no integer form: one error names it."""

  class BnFirst(nnx.Module):
    def __init__(self, rngs):
      self.bn = nnx.BatchNorm(3, rngs=rngs)
      self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.bn(x).mean((1, 2)))

  model = BnFirst(nnx.Rngs(0))
  model.eval()
  x, _ = arrays(2, 0)
  qmodel, qvars = haqjax.quantize(model, None, x[:1])
  with pytest.raises(ValueError, match=r"^deploy: BatchNorm 'bn' does not directly follow"):
    build.build(qmodel, qvars, Policy.uniform(("head",), 8, 8), x[:1])

