"""The integer engine of models QAT-trained with learned quantizers.

The quickstart CNN with random weights and BatchNorm statistics, calibrated,
then with every learned parameter (LSQ's activation and per-channel weight
steps, PACT's and HAQ's clips) moved away from its calibrated value, so that
a parameter read wrongly (or a step used other than as the forward pass uses
it) shows. At W4A4 and a mixed policy:

* the encoding reproduces the fake-quant model: on every layer's recorded
  input, `dequantize(quantize(x))` on the engine's encoding equals the
  layer's activation quantizer's output bit for bit;
* the engine's codes agree with those codes as `deploy_engine_test` requires,
  and its predictions but near ties;
* one compilation of the engine serves both policies;
* onnxruntime runs the exported QDQ model to the engine's logits as
  `deploy_export_test` checks them.

LSQ+ is rejected in one line (its grid holds real zero only for an integral
`offset / step`), as are quantizers outside the supported lists.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deploy_engine_test import _check_codes
from deploy_engine_test import _check_predictions
from deploy_engine_test import _images
from deploy_engine_test import _randomize_bn
from haqjax import models
from haqjax.deploy import agreement
from haqjax.deploy import build
from haqjax.deploy import capture
from haqjax.deploy import engine
from haqjax.deploy import quantizers
from haqjax.nn import layer_table
from haqjax.nn.calibrate import calibrate
from haqjax.policy import Policy
from haqjax.quant import LSQ
from haqjax.quant import QuantScheme
from haqjax.quant import affine
from haqjax.quant.registry import act_quantizer
from haqjax.quant.registry import weight_quantizer
from haqjax.treeutil import get_path

SHAPE = (28, 28, 1)
SCHEMES = {"lsq": ("lsq", "lsq"), "pact": ("minmax", "pact"), "haq": ("minmax", "haq")}
# The learned parameters, and how far each is moved (a factor per element).
_MOVES = {"act_quant/step": (0.6, 1.6), "act_quant/clip": (0.4, 1.3),
          "weight_quant/step": (0.6, 1.6)}


def _model(weight, act):
  scheme = QuantScheme(weight=weight_quantizer(weight), act=act_quantizer(act))
  return models.create("quickstart_cnn", num_classes=10, quant_scheme=scheme)


def _policies(names):
  k = len(names)
  mixed = Policy.create(names, [(8, 4, 2, 6, 1, 5, 3)[i % 7] for i in range(k)],
                        [(4, 6, 3, 8, 5, 2, 7)[i % 7] for i in range(k)])
  return {"w4a4": Policy.uniform(names, 4, 4), "mixed": mixed}


def _move(variables, seed):
  """Every learned step and clip times a random factor of `_MOVES`."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    move = next((r for k, r in _MOVES.items() if key.endswith(k)), None)
    if move is None:
      return leaf
    return leaf * jnp.asarray(rng.uniform(*move, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.fixture(scope="module", params=list(SCHEMES))
def trained(request):
  """(model, variables, images, layer names) of one scheme, parameters moved."""
  model = _model(*SCHEMES[request.param])
  x = _images(SHAPE, 32, 0)
  variables = _randomize_bn(jax.jit(model.init)(jax.random.PRNGKey(0), x[:1]), 1)
  names = layer_table(model, (1, *SHAPE)).names
  variables = calibrate(model, variables, [x], Policy.uniform(names, 4, 4))
  return model, _move(variables, 2), x, names


def _check_fake_quant_codes(graph, model, variables, x):
  """Each layer's quantizer output on its recorded input is the encoding's grid."""
  _, inputs = agreement.fake_quant_run(model, variables, x, graph.policy)
  infos = [op.attrs["info"] for op in capture.capture(model, variables, x[:1]).ops
           if op.kind == "layer"]
  for info in infos:
    enc = graph.encoding(f"{info.name}:in")
    a_bits = int(graph.policy.bits_for(info.name)[1])
    params = get_path(variables["params"], info.path)["act_quant"]
    act_q = info.quantizers[1]
    _, _, spec = quantizers.act_encoding(info.name, act_q, params, a_bits, info.in_shape)
    scale, zero_point = jnp.float32(enc.scale), jnp.float32(enc.zero_point)
    codes = affine.quantize(inputs[info.name], scale, zero_point, a_bits, spec)
    ours = np.asarray(affine.dequantize(codes, scale, zero_point))
    theirs = np.asarray(act_q(params, inputs[info.name], a_bits))
    np.testing.assert_array_equal(ours, theirs, err_msg=info.name)
    assert len(np.unique(np.asarray(codes))) > 2, info.name  # The grid is exercised.


def test_agrees_with_fake_quant(trained):
  model, variables, x, names = trained
  traces = None
  for label, policy in _policies(names).items():
    graph = build.build(model, variables, policy, x[:1])
    _check_fake_quant_codes(graph, model, variables, x)
    _check_predictions(graph, model, variables, x)
    codes = agreement.compare_codes(graph, model, variables, x)
    assert set(codes) == set(names), label
    _check_codes(codes, label)
    if traces is None:
      traces = engine.trace_count()
  assert engine.trace_count() == traces  # One compilation served both policies.


def test_onnxruntime_agrees_with_the_engine(trained):
  from deploy_export_test import _ort_tensors  # pylint: disable=g-import-not-at-top
  model, variables, x, names = trained
  graph = build.build(model, variables, Policy.uniform(names, 4, 4), x[:1])
  images = np.asarray(x)
  logits, env = engine.run(graph, images, intermediates=True)
  logits, env = np.asarray(logits), {k: np.asarray(v) for k, v in env.items()}
  got = _ort_tensors(graph, images)
  first = graph.node("stem").inputs[0]
  assert np.mean(got[first] != env[first]) <= 1e-4
  # As deploy_export_test: the logits differ only through the classifier's
  # differing input codes.
  fc = graph.node("classifier")
  step = np.abs(fc.encoding.scale.astype(np.float64)) * 2.0 ** int(fc.arrays["acc_shift"])
  w_real = np.abs(fc.arrays["weight"] * step).max(axis=1)
  moved = np.abs(got[fc.inputs[0]] - env[fc.inputs[0]]) @ w_real
  diff = np.abs(got[graph.output] - logits).max(axis=1)
  assert np.all(diff <= moved + 1e-5 * np.abs(logits).max())
  assert np.mean(got[graph.output].argmax(-1) == logits.argmax(-1)) >= 0.96


@pytest.mark.parametrize("weight, act, message", [
    ("lsq", "lsq+", r"'stem' has LSQ with a learned offset \(LSQ\+\)"),
    ("minmax", "dynamic", r"'stem' has activation quantizer MinMaxActivation; allowed: "
     "StaticRange, LSQ, PACT, HAQActivation"),
    ("binary", "pact", r"'stem' has weight quantizer BinaryWeight; allowed: MinMaxWeight, "
     "StaticRange, LSQ$"),
])
def test_unsupported_quantizers_are_one_error(weight, act, message):
  model = _model(weight, act)
  x = _images(SHAPE, 4, 3)
  names = layer_table(model, (1, *SHAPE)).names
  policy = Policy.uniform(names, 4, 4)
  variables = model.init(jax.random.PRNGKey(0), x[:1])  # The quantizer alone fails.
  with pytest.raises(ValueError, match=r"^deploy: layer " + message):
    build.build(model, variables, policy, x[:1])


def test_a_step_other_than_the_forward_pass_fails_loudly(monkeypatch):
  quantizer = LSQ(sign="unsigned", batch_axis=0)
  params = {"step": jnp.float32(0.1)}
  enc, _, _ = quantizers.act_encoding("conv", quantizer, params, 4, (1, 8, 8, 4))
  assert (enc.signed, enc.zero_point, enc.dtype) == (False, 0, "uint8")
  off = np.nextafter(enc.scale, np.float32(1.0))  # One ulp off.
  monkeypatch.setattr(quantizers, "_lsq_act_step", lambda *args: off)
  with pytest.raises(ValueError, match="differs from its integer grid"):
    quantizers.act_encoding("conv", quantizer, params, 4, (1, 8, 8, 4))
