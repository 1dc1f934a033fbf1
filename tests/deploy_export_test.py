"""Tests of the deployment exports: StableHLO, encodings.json and ONNX."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.bitwidths import FLOAT_BITS
from haqjax.deploy import encodings
from haqjax.deploy import graph as g
from haqjax.deploy import onnx_export
from haqjax.deploy import packing
from haqjax.deploy import stablehlo
from haqjax.nn import layer_table
from haqjax.nn.calibrate import calibrate
from haqjax.policy import Policy
from haqjax.quant.registry import act_quantizer
from haqjax.quant.registry import weight_quantizer
from haqjax.quant.rules import QuantScheme


def _int8_conv(x, w, bias):
  acc = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.int32)
  return jnp.clip(acc + bias, -(2**20), 2**20)


def _conv_args(batch=2):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.integers(-128, 128, (batch, 6, 5, 3)), jnp.int8),
          jnp.asarray(rng.integers(-128, 128, (3, 3, 3, 4)), jnp.int8),
          jnp.asarray(rng.integers(-1000, 1000, (4,)), jnp.int32))


def test_stablehlo_reloads_and_runs_exactly(tmp_path):
  args = _conv_args()
  path = tmp_path / "model.stablehlo"
  size = stablehlo.save_stablehlo(path, jax.jit(_int8_conv), *args)
  assert size == os.path.getsize(path) > 0
  assert os.listdir(tmp_path) == ["model.stablehlo"]
  exported = stablehlo.load_exported(path)
  assert [a.dtype for a in exported.in_avals] == [jnp.int8, jnp.int8, jnp.int32]
  run = stablehlo.load_stablehlo(path)
  out = run(*args)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, _int8_conv(*args))
  with pytest.raises(Exception):  # Shapes are fixed without symbolic_batch.
    run(*_conv_args(batch=3))


def test_stablehlo_symbolic_batch(tmp_path):
  path = tmp_path / "model.stablehlo"
  stablehlo.save_stablehlo(path, _int8_conv, *_conv_args(), symbolic_batch=True,
                           platforms=("cpu", "cuda"))
  assert stablehlo.load_exported(path).platforms == ("cpu", "cuda")
  run = stablehlo.load_stablehlo(path)
  for batch in (1, 5):
    args = _conv_args(batch)
    np.testing.assert_array_equal(run(*args), _int8_conv(*args))
  with pytest.raises(ValueError, match="scalar"):
    stablehlo.export_function(lambda s: s, jnp.int32(1), symbolic_batch=True)


# --- Hand-built graphs and a numpy evaluation of graph.py's semantics. ---

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _fixed_point(real):
  """(multiplier, shift): real ~= multiplier * 2^(shift - 31), |m| in [2^30, 2^31)."""
  real = np.asarray(real, np.float64)
  f, e = np.frexp(real)
  m = np.round(f * 2.0**31).astype(np.int64)
  carry = np.abs(m) == 2**31
  m, e = np.where(carry, m // 2, m), np.where(carry, e + 1, e)
  return (np.where(real == 0, 0, m).astype(np.int32),
          np.where(real == 0, 0, e).astype(np.int32))


def _requantize_ref(v, m, shift, zp, lo, hi):
  v = np.clip(v.astype(np.int64) << np.maximum(shift, 0), INT32_MIN, INT32_MAX)
  prod = v * m.astype(np.int64)
  prod = prod + np.where(prod >= 0, 1 << 30, 1 - (1 << 30))
  r = np.sign(prod) * (np.abs(prod) >> 31)  # Truncated toward zero.
  right = np.maximum(-shift, 0)
  mask = (np.int64(1) << right) - 1
  rem, threshold = r & mask, (mask >> 1) + (r < 0)
  r = (r >> right) + (rem > threshold)
  return np.clip(r + zp, lo, hi)


def _single_rounding_ref(v, m, shift, zp, lo, hi):
  n = 31 - shift.astype(np.int64)  # x * m * 2^(shift - 31), rounded half up.
  r = (v.astype(np.int64) * m.astype(np.int64) + (np.int64(1) << (n - 1))) >> n
  return np.clip(np.clip(r, INT32_MIN, INT32_MAX) + zp, lo, hi)


def _windows(x, kh, kw, strides, padding, fill):
  x = np.pad(x, ((0, 0), *padding, (0, 0)), constant_values=fill)
  w = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  return w[:, ::strides[0], ::strides[1]]  # [N, H', W', C, kh, kw]


def evaluate(graph, images, given=None, rounding="fixed_point"):
  """The graph on `images`, per graph.py's semantics: every tensor by name.

  With `given` (tensor name -> integers), each node reads its inputs from
  `given` rather than from its own results, so each op is checked alone.
  rounding='float' requantizes as ONNX's QDQ form does: the real value
  `(x - zx) * scale_x` divided by the output scale, rounded half to even.
  """
  env = {graph.input: np.asarray(images, np.float32)}
  given = env if given is None else {**given, graph.input: env[graph.input]}
  for node in graph.nodes:
    a, enc, x = node.arrays, node.encoding, given[node.inputs[0]]
    x_enc = graph.encoding(node.inputs[0])
    zx = 0 if x_enc is None else x_enc.zero_point
    if node.op == "quantize":
      q = np.round(x.astype(np.float32) * a["inv_scale"]) + enc.zero_point
      y = np.clip(q, a["lo"], a["hi"]).astype(np.int64)
    elif node.op == "dequantize":
      y = (x - zx).astype(np.float32) * x_enc.scale
    elif node.op == "conv":
      kh, kw, cin, cout = a["weight"].shape
      win = _windows(x.astype(np.int64) - zx, kh, kw, node.attrs["strides"],
                     node.attrs["padding"], 0)
      groups = node.attrs["groups"]
      y = np.concatenate([  # Group k: input channels k*cin.., outputs k*cout/groups..
          np.einsum("nhwcij,ijco->nhwo", win[:, :, :, k * cin:(k + 1) * cin],
                    a["weight"][..., k * cout // groups:(k + 1) * cout // groups].astype(np.int64))
          for k in range(groups)], axis=-1)
      y = (y << int(a.get("acc_shift", 0))) + a["bias"]
    elif node.op == "dense":
      y = (x.astype(np.int64) - zx) @ a["weight"].astype(np.int64)
      y = (y << int(a.get("acc_shift", 0))) + a["bias"]
    elif node.op == "requantize" and rounding == "float":
      real = (x - zx).astype(np.float32) * x_enc.scale
      y = np.clip(np.round(real / enc.scale) + enc.zero_point, a["lo"], a["hi"])
    elif node.op == "requantize" and node.attrs.get("rounding") == "single":
      y = _single_rounding_ref(x - zx, a["multiplier"], a["shift"], enc.zero_point, a["lo"], a["hi"])
    elif node.op == "requantize":
      y = _requantize_ref(x - zx, a["multiplier"], a["shift"], enc.zero_point, a["lo"], a["hi"])
    elif node.op == "add":
      y = np.clip(x + given[node.inputs[1]], a["lo"], a["hi"])
    elif node.op == "clamp":
      y = np.clip(x, a["lo"], a["hi"])
    elif node.op == "max_pool":
      win = _windows(x, *node.attrs["window"], node.attrs["strides"], node.attrs["padding"],
                     np.iinfo(np.int64).min)
      y = win.max(axis=(-2, -1))
    elif node.op == "mean":
      y = (x - zx).sum(axis=(1, 2))
    elif node.op == "reshape":
      y = x.reshape(x.shape[0], *node.attrs["shape"])
    elif node.op in ("float_conv", "float_dense"):
      if node.op == "float_conv":
        kh, kw, _, _ = a["kernel"].shape
        win = _windows(x, kh, kw, node.attrs["strides"], node.attrs["padding"], 0)
        y = np.einsum("nhwcij,ijco->nhwo", win, a["kernel"])
      else:
        y = x @ a["kernel"]
      y = np.clip(y * a["mul"] + a["bias"], a["lo"], a["hi"]).astype(np.float32)
    env[node.name] = y
  return env


def _codes_enc(bits, signed, scale, zero_point=0):
  return g.Encoding(bits=bits, signed=signed, scale=np.float32(scale), zero_point=zero_point,
                    dtype="int8" if signed else "uint8", symmetric=zero_point == 0)


def _acc_enc(scale):
  return g.Encoding(bits=32, signed=True, scale=np.asarray(scale, np.float32), zero_point=0,
                    dtype="int32", axis=-1)


def _wide_enc(scale):
  return g.Encoding(bits=32, signed=True, scale=np.float32(scale), zero_point=0, dtype="int32")


def _quantize(name, src, enc, lo=None, hi=None):
  qmin, qmax = enc.qrange
  return g.Node(name=name, op="quantize", inputs=(src,), encoding=enc, arrays={
      "inv_scale": np.float32(1) / enc.scale,
      "lo": np.int32(qmin if lo is None else lo), "hi": np.int32(qmax if hi is None else hi)})


def _requantize(name, src, src_scale, enc, lo=None, hi=None, rounding="gemmlowp"):
  qmin, qmax = enc.qrange
  real = np.asarray(src_scale, np.float64) / np.float64(enc.scale)
  m, shift = _fixed_point(real)
  return g.Node(name=name, op="requantize", inputs=(src,), encoding=enc,
                attrs={"rounding": rounding}, arrays={
      "multiplier": m, "shift": shift, "real_multiplier": real.astype(np.float32),
      "lo": np.int32(qmin if lo is None else lo), "hi": np.int32(qmax if hi is None else hi)})


def _layer(rng, name, src, x_scale, shape, w_bits, *, op="conv", strides=(1, 1),
           padding=((1, 1), (1, 1)), bn_mul=None, groups=1):
  half = 1 << (w_bits - 1)
  weight = rng.integers(-half, half, shape).astype(np.int8)
  cout = shape[-1]
  weight_scale = rng.uniform(0.01, 0.05, cout).astype(np.float32)
  bn_mul = np.ones(cout, np.float32) if bn_mul is None else bn_mul
  attrs = ({"strides": strides, "padding": padding, "groups": groups} if op == "conv" else {})
  return g.Node(name=name, op=op, inputs=(src,), attrs=attrs, arrays={
      "weight": weight, "weight_scale": weight_scale,
      "bias": rng.integers(-300, 300, cout).astype(np.int32)},
      encoding=_acc_enc(np.float32(x_scale) * weight_scale * bn_mul))


def residual_graph(seed=0, a_bits=4, rounding="gemmlowp"):
  """Conv-ReLU-pool, two branches added in int32, mean, dense: every integer op."""
  rng = np.random.default_rng(seed)
  nodes = []
  x_enc = _codes_enc(8, False, 1 / 127, 128)  # Asymmetric input.
  nodes.append(_quantize("c1:in", "image", x_enc))
  bn_mul = np.ones(8, np.float32)
  bn_mul[[2, 5]] = (-0.5, 1.7)  # A negative BatchNorm gamma.
  nodes.append(_layer(rng, "c1", "c1:in", x_enc.scale, (3, 3, 3, 8), 4, bn_mul=bn_mul))
  a_enc = _codes_enc(a_bits, False, 0.05)
  nodes.append(_requantize("c2:in", "c1", nodes[-1].encoding.scale, a_enc, lo=0, rounding=rounding))
  nodes.append(g.Node(name="pool", op="max_pool", inputs=("c2:in",), encoding=a_enc,
                      attrs={"window": (2, 2), "strides": (2, 2),
                             "padding": ((0, 0), (0, 0))}))
  wide = _wide_enc(0.002)
  cap = g.WIDE_CAPACITY
  nodes.append(_layer(rng, "c2", "pool", a_enc.scale, (3, 3, 8, 6), 3, strides=(2, 2),
                      padding=((0, 1), (1, 1))))
  nodes.append(_requantize("c2:wide", "c2", nodes[-1].encoding.scale, wide, -cap, cap, rounding=rounding))
  nodes.append(_layer(rng, "c3", "pool", a_enc.scale, (1, 1, 8, 6), 8, strides=(2, 2),
                      padding=((0, 0), (0, 0))))
  nodes.append(_requantize("c3:wide", "c3", nodes[-1].encoding.scale, wide, -cap, cap, rounding=rounding))
  nodes.append(g.Node(name="add", op="add", inputs=("c2:wide", "c3:wide"), encoding=wide,
                      arrays={"lo": np.int32(-cap), "hi": np.int32(cap)}))
  nodes.append(g.Node(name="relu", op="clamp", inputs=("add",), encoding=wide,
                      arrays={"lo": np.int32(0), "hi": np.int32(cap)}))
  pooled = _wide_enc(wide.scale / 4)  # A 2x2 map.
  nodes.append(g.Node(name="mean", op="mean", inputs=("relu",), encoding=pooled))
  fc_enc = _codes_enc(6, True, 0.03, -5)
  nodes.append(_requantize("fc:in", "mean", pooled.scale, fc_enc, rounding=rounding))
  nodes.append(_layer(rng, "fc", "fc:in", fc_enc.scale, (6, 10), 8, op="dense"))
  nodes.append(g.Node(name="logits", op="dequantize", inputs=("fc",)))
  policy = Policy.create(["c1", "c2", "c3", "fc"], [4, 3, 8, 8], [8, a_bits, a_bits, 6])
  return g.Graph(nodes=tuple(nodes), input="image", output="logits",
                 input_shape=(8, 8, 3), policy=policy)


def flat_graph(seed=1):
  """A float first layer (ReLU6), codes flattened from NHWC into a dense layer."""
  rng = np.random.default_rng(seed)
  nodes = [g.Node(name="c0", op="float_conv", inputs=("image",),
                  attrs={"strides": (2, 2), "padding": ((1, 1), (1, 1)), "groups": 1},
                  arrays={"kernel": rng.normal(0, 0.5, (3, 3, 1, 4)).astype(np.float32),
                          "mul": rng.uniform(0.5, 1.5, 4).astype(np.float32),
                          "bias": rng.normal(0, 0.5, 4).astype(np.float32),
                          "lo": np.float32(0), "hi": np.float32(6)})]
  a_enc = _codes_enc(3, False, 6 / 7)
  nodes.append(_quantize("fc:in", "c0", a_enc))
  nodes.append(g.Node(name="flat", op="reshape", inputs=("fc:in",), encoding=a_enc,
                      attrs={"shape": (3 * 3 * 4,)}))
  nodes.append(_layer(rng, "fc", "flat", a_enc.scale, (36, 5), 2, op="dense"))
  nodes.append(g.Node(name="logits", op="dequantize", inputs=("fc",)))
  return g.Graph(nodes=tuple(nodes), input="image", output="logits", input_shape=(6, 6, 1))


def depthwise_graph(seed=2, rounding="gemmlowp"):
  """A depthwise convolution between two dense-grid layers, 8-bit signed codes."""
  rng = np.random.default_rng(seed)
  x_enc = _codes_enc(8, True, 1 / 100)
  nodes = [_quantize("dw:in", "image", x_enc)]
  nodes.append(_layer(rng, "dw", "dw:in", x_enc.scale, (3, 3, 1, 4), 8, groups=4))
  a_enc = _codes_enc(5, False, 0.02, 3)
  nodes.append(_requantize("pw:in", "dw", nodes[-1].encoding.scale, a_enc, lo=3, rounding=rounding))
  nodes.append(_layer(rng, "pw", "pw:in", a_enc.scale, (1, 1, 4, 6), 6,
                      padding=((0, 0), (0, 0))))
  nodes.append(g.Node(name="out", op="dequantize", inputs=("pw",)))
  return g.Graph(nodes=tuple(nodes), input="image", output="out", input_shape=(5, 5, 4))


# --- encodings.json ---


def test_aimet_encoding_reproduces_aimets_example():
  # The activation encoding "20" of AIMET's specification (PyTorch example).
  enc = encodings.aimet_encoding(8, False, 0.018501389771699905, 114, False)
  assert enc["offset"] == -114 and enc["is_symmetric"] == "False"
  np.testing.assert_allclose([enc["min"], enc["max"]],
                             [-2.109158515930176, 2.6086959838867188], rtol=1e-6)


@pytest.mark.parametrize("bits,signed,zero_point,offset", [
    (8, True, 0, -128), (4, True, 0, -8), (6, True, -5, -27), (4, False, 0, 0),
    (8, False, 128, -128), (1, False, 0, 0)])
def test_offset_is_minus_the_unsigned_zero_point(bits, signed, zero_point, offset):
  assert encodings.aimet_offset(bits, signed, zero_point) == offset
  enc = encodings.aimet_encoding(bits, signed, 0.5, zero_point, zero_point == 0)
  # Code c of the haqjax grid is q = c - qmin_full on AIMET's unsigned grid:
  # (c - zero_point) * scale == (q + offset) * scale at both ends.
  lo = -(1 << (bits - 1)) if signed else 0
  assert enc["min"] == (lo - zero_point) * 0.5
  assert enc["max"] == (lo + (1 << bits) - 1 - zero_point) * 0.5


def test_graph_encodings(tmp_path):
  graph = residual_graph()
  path = tmp_path / "encodings.json"
  size = encodings.save_encodings(path, graph)
  assert size == os.path.getsize(path)
  enc = json.loads(path.read_text())
  assert enc["version"] == "0.5.0"
  # Codes tensors only: the int32 accumulators and residual stream have none.
  assert list(enc["activation_encodings"]) == ["c1:in", "c2:in", "pool", "fc:in"]
  (fc_in,) = enc["activation_encodings"]["fc:in"]
  assert fc_in == encodings.aimet_encoding(6, True, np.float32(0.03), -5, False)
  assert fc_in["offset"] == 5 - 32 and fc_in["bitwidth"] == 6
  params = enc["param_encodings"]
  assert list(params) == ["c1/kernel", "c2/kernel", "c3/kernel", "fc/kernel"]
  assert [len(params[k]) for k in params] == [8, 6, 6, 10]  # Per output channel.
  assert [params[k][0]["bitwidth"] for k in params] == [4, 3, 8, 8]  # The policy's.
  assert {e["offset"] for e in params["c2/kernel"]} == {-4}
  assert [e["scale"] for e in params["fc/kernel"]] == graph.node("fc").arrays[
      "weight_scale"].tolist()
  flat = encodings.graph_encodings(flat_graph())
  assert flat["param_encodings"]["c0/kernel"] == [{"dtype": "float", "bitwidth": 32}]
  assert flat["param_encodings"]["fc/kernel"][0]["bitwidth"] == 2  # No policy: from the codes.


# --- ONNX ---


def _ort_tensors(graph, images, optimize=True):
  """onnxruntime's value of every graph tensor (codes as integers)."""
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  model = onnx_export.to_onnx(graph)
  output = model.graph.output[0].name  # '<output>:nhwc' for a 4-d output.
  names = [n.name for n in graph.nodes]
  for name in names:
    if name != graph.output:
      model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
  options = ort.SessionOptions()
  if not optimize:
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  session = ort.InferenceSession(model.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
  values = dict(zip([o.name for o in session.get_outputs()],
                    session.run(None, {graph.input: images})))
  if output != graph.output:
    values[graph.output] = values[output].transpose(0, 3, 1, 2)
  out = {}
  for name in names:
    v = values[name]
    if v.ndim == 4:
      v = v.transpose(0, 2, 3, 1)  # NCHW inside the model.
    enc = graph.encoding(name)
    out[name] = v if enc is None else np.round(v / enc.scale + enc.zero_point).astype(np.int64)
  return out


def _images(graph, n=256, seed=5):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (n, *graph.input_shape)).astype(np.float32)


def test_onnx_model_is_qdq(tmp_path):
  onnx = pytest.importorskip("onnx")
  graph = residual_graph()
  path = tmp_path / "model.onnx"
  size = onnx_export.save_onnx(path, graph)
  assert size == os.path.getsize(path)
  model = onnx.load(str(path))
  assert model.opset_import[0].version == onnx_export.OPSET
  (inp,) = model.graph.input
  assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 8, 8, 3]
  (out,) = model.graph.output
  assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 10]
  nodes = {n.name: n for n in model.graph.node}
  inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
  # Sub-8-bit codes and ReLU: Q -> Clip(codes) -> DQ; uint8 zero point.
  assert nodes["c2:in:clip"].input[0] == "c2:in:q"
  assert nodes["c2:in"].op_type == "DequantizeLinear"
  assert nodes["c2:in"].input[0] == "c2:in:clip"
  assert inits[nodes["c2:in:clip"].input[1]] == 0 and inits[nodes["c2:in:clip"].input[2]] == 15
  assert inits[nodes["c2:in:q"].input[2]].dtype == np.uint8
  assert inits[nodes["fc:in:q"].input[2]].dtype == np.int8
  assert inits[nodes["fc:in:q"].input[2]] == -5
  assert "c1:in:clip" not in nodes  # Full 8-bit grid: no Clip.
  # Per-channel int8 weights, OIHW, axis 0; int32 bias at the accumulator scale.
  weight_dq = nodes["c1/kernel"]
  assert weight_dq.op_type == "DequantizeLinear"
  assert onnx.helper.get_attribute_value(weight_dq.attribute[0]) == 0
  codes = inits[weight_dq.input[0]]
  assert codes.dtype == np.int8
  np.testing.assert_array_equal(codes, graph.node("c1").arrays["weight"].transpose(3, 2, 0, 1))
  bias = inits[nodes["c1/bias"].input[0]]
  assert bias.dtype == np.int32
  np.testing.assert_array_equal(inits[nodes["c1/bias"].input[1]], graph.encoding("c1").scale)
  # The bias is added after the op (not its bias input: see onnx_export).
  assert nodes["c1:conv"].op_type == "Conv" and nodes["fc:gemm"].op_type == "Gemm"
  assert len(nodes["c1:conv"].input) == 2 and len(nodes["fc:gemm"].input) == 2
  assert list(nodes["c1"].input) == ["c1:conv", "c1/bias"] and nodes["c1"].op_type == "Add"
  assert list(nodes["fc"].input) == ["fc:gemm", "fc/bias"] and nodes["fc"].op_type == "Add"
  assert [nodes[n].op_type for n in ("pool", "mean:pool", "mean")] == [
      "MaxPool", "GlobalAveragePool", "Flatten"]


@pytest.mark.parametrize("graph_fn", [residual_graph, flat_graph, depthwise_graph])
def test_onnx_each_op_equals_qdq_float_rounding(graph_fn):
  # Each op fed onnxruntime's own inputs, against the graph with
  # requantization as QDQ computes it (real value / scale, half to even):
  # equal up to float32 rounding, which flips a code only where the real
  # value is within ~|v| 2^-23 of a half (|v| < 2^10 codes here: < 1e-3).
  graph = graph_fn()
  images = _images(graph)
  ort_values = _ort_tensors(graph, images)
  ref = evaluate(graph, images, given=ort_values, rounding="float")
  for node in graph.nodes:
    got, want = ort_values[node.name], ref[node.name]
    if node.encoding is None:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    else:
      diff = np.abs(got - want)
      assert diff.max() <= 1 and diff.mean() <= 1e-3, (node.name, diff.max(), diff.mean())


@pytest.mark.parametrize("graph_fn", [residual_graph, depthwise_graph])
@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
def test_onnx_each_op_against_fixed_point_requantization(graph_fn, rounding):
  # Against the graph's own semantics only `requantize` differs, by one code.
  # TFLite's single rounding (v * m * 2^(shift - 31) rounded half up) differs
  # from QDQ's half to even only at exact ties and float32 near-ties: at most
  # 1e-3 of the codes, as above. gemmlowp rounds twice (v * m / 2^31 to an
  # integer, then the right shift by R): after the first rounding the value is
  # a multiple of 2^-R codes, so it lands on a tie (rounded away from 0) with
  # probability 2^-R, half of which the exact value rounds the other way:
  # about 2^-(R + 1) of the codes not clamped.
  graph = graph_fn(rounding=rounding)
  images = _images(graph, n=512)
  ort_values = _ort_tensors(graph, images, optimize=False)
  ref = evaluate(graph, images, given=ort_values)
  for node in graph.nodes:
    if node.encoding is None:
      continue
    diff = np.abs(ort_values[node.name] - ref[node.name])
    if node.op != "requantize":
      assert diff.max() == 0, node.name
      continue
    assert diff.max() <= 1, node.name
    if rounding == "single":
      assert diff.mean() <= 1e-3, (node.name, diff.mean())
      continue
    rate = np.broadcast_to(2.0 ** -(np.maximum(-node.arrays["shift"], 0) + 1), diff.shape)
    # The expected count plus four binomial standard deviations.
    bound = rate.sum() + 4 * np.sqrt(rate.sum()) + 1
    assert diff.sum() <= bound, (node.name, diff.sum(), bound)


@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
def test_onnx_end_to_end_agreement(a_bits, rounding):
  # Free running, one-code flips propagate. With single rounding the codes
  # only flip where a wide (int32) value falls within float32 rounding of a
  # half (~1e-4, above), here amplified by the mean over a 2x2 map; with
  # gemmlowp ~2^-(R+1) flip at each requantization. Each flip moves a wide
  # value by one step of hundreds, so the logits move by well under 2% on
  # average and the predictions hardly change.
  graph = residual_graph(a_bits=a_bits, rounding=rounding)
  images = _images(graph, n=512)
  got, want = _ort_tensors(graph, images), evaluate(graph, images)
  if rounding == "single":
    for node in graph.nodes:
      if node.encoding is not None and not node.encoding.is_wide:
        assert np.mean(got[node.name] != want[node.name]) <= 2e-3, node.name
  got, want = got["logits"], want["logits"]
  assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.98
  assert np.abs(got - want).mean() <= 0.02 * np.abs(want).mean()
  flat = flat_graph()  # No requantization: equal up to float32 rounding.
  np.testing.assert_allclose(_ort_tensors(flat, _images(flat))["logits"],
                             evaluate(flat, _images(flat))["logits"], atol=1e-4)


# --- The bundle ---


def _integer_stand_in(images):
  """A small integer network in jax: int8 codes, int32 accumulation."""
  codes = jnp.clip(jnp.round(images * 4), -8, 7).astype(jnp.int8).reshape(images.shape[0], -1)
  weight = (jnp.arange(codes.shape[1] * 5, dtype=jnp.int32) % 15 - 7).astype(jnp.int8)
  acc = jnp.dot(codes, weight.reshape(-1, 5), preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * 0.1


def test_export_all(tmp_path):
  pytest.importorskip("onnx")
  graph = residual_graph()
  sizes = onnx_export.export_all(graph, tmp_path)
  folder = tmp_path / "export"
  assert sorted(os.listdir(folder)) == sorted(sizes) == [
      "encodings.json", "model.onnx", "weights.bin"]
  assert all(os.path.getsize(folder / k) == v for k, v in sizes.items())
  weights = {t.name: t for t in packing.load_packed(folder / "weights.bin")}
  assert list(weights) == ["c1/kernel", "c1/bias", "c2/kernel", "c2/bias", "c3/kernel",
                           "c3/bias", "fc/kernel", "fc/bias"]
  for layer in ("c1", "c2", "fc"):
    node = graph.node(layer)
    np.testing.assert_array_equal(weights[f"{layer}/kernel"].codes, node.arrays["weight"])
    np.testing.assert_array_equal(weights[f"{layer}/kernel"].scale, node.arrays["weight_scale"])
    np.testing.assert_array_equal(weights[f"{layer}/bias"].codes, node.arrays["bias"])
    np.testing.assert_array_equal(weights[f"{layer}/bias"].scale, node.encoding.scale)
  assert weights["c2/kernel"].bits == 3 and weights["c1/bias"].bits == 32
  kernel_bits = sum(graph.node(n).arrays["weight"].size * b
                    for n, b in (("c1", 4), ("c2", 3), ("c3", 8), ("fc", 8)))
  channels = 8 + 6 + 6 + 10
  # Packed kernels, their float32 scales, int32 biases and their scales;
  # then at most a byte of zero points per channel, the magic and a header.
  payload = kernel_bits / 8 + 4 * channels + 8 * channels
  assert payload <= sizes["weights.bin"] <= payload + channels + 12 + 300


def test_export_all_with_an_engine_function(tmp_path):
  graph = flat_graph()
  sizes = onnx_export.export_all(graph, tmp_path, engine_fn=_integer_stand_in)
  assert "model.stablehlo" in sizes
  run = stablehlo.load_stablehlo(tmp_path / "export" / "model.stablehlo")
  for n in (1, 3):  # Any batch size.
    images = _images(graph, n=n)
    np.testing.assert_array_equal(run(images), _integer_stand_in(images))


# --- Against the integer engine, on the quickstart CNN ---


@pytest.fixture(scope="module")
def engine():
  return pytest.importorskip("haqjax.deploy.engine")


@pytest.fixture(scope="module")
def quickstart():
  """The quickstart CNN (random weights) with static activation ranges, and images."""
  scheme = QuantScheme(weight=weight_quantizer("minmax"), act=act_quantizer("static"))
  model = models.create("quickstart_cnn", num_classes=10, quant_scheme=scheme)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  images = np.random.default_rng(0).uniform(0, 1, (128, 28, 28, 1)).astype(np.float32)
  return model, variables, layer_table(model, (1, 28, 28, 1)).names, images


_POLICIES = {  # (w_bits, a_bits); 'mixed' keeps the stem in float.
    "w8a8": (8, 8), "w4a4": (4, 4),
    "mixed": ([8, 4, 2, 6, 3, 5, 8], [FLOAT_BITS, 4, 6, 3, 8, 5, 4])}


def _quickstart_graph(quickstart, policy_name):
  deploy_build = pytest.importorskip("haqjax.deploy.build")
  model, variables, names, images = quickstart
  policy = Policy.create(names, *_POLICIES[policy_name])
  variables = calibrate(model, variables, [images[:64]], policy)
  return deploy_build.build(model, variables, policy, images[:8])


@pytest.mark.parametrize("policy_name", list(_POLICIES))
def test_onnx_agrees_with_the_engine(engine, quickstart, policy_name):
  graph = _quickstart_graph(quickstart, policy_name)
  images = quickstart[3]
  logits, env = engine.run(graph, images, intermediates=True)
  logits, env = np.asarray(logits), {k: np.asarray(v) for k, v in env.items()}
  codes = [n.name for n in graph.nodes if n.encoding is not None and not n.encoding.is_wide]
  assert len(codes) == (6 if policy_name == "mixed" else 7)
  if policy_name != "mixed":  # A float layer is not bit-exact across libraries.
    ref = evaluate(graph, images)  # graph.py's semantics, in numpy: the engine.
    for name in [*codes, graph.output]:
      np.testing.assert_array_equal(ref[name], env[name], err_msg=name)
  got = _ort_tensors(graph, images)
  # Op by op (each fed onnxruntime's inputs): the graph requantizes with
  # single rounding, which QDQ reproduces but for exact ties and float32
  # near-ties (as in test_onnx_each_op_against_fixed_point_requantization).
  local = evaluate(graph, images, given=got)
  for name in codes:
    diff = np.abs(got[name] - local[name])
    assert diff.max() <= 1 and diff.mean() <= 1e-3, (name, diff.max(), diff.mean())
  # Free running, a flipped code changes many codes of the next layers, so
  # the fraction grows with depth (measured with 512 images and warmed-up
  # BatchNorm statistics at W8A8: 2.5e-6 at the stem's input, 1.2e-3 at
  # conv5's, 8.5e-3 at the classifier's; W4A4: none). The first agrees:
  assert np.mean(got[codes[0]] != env[codes[0]]) <= 1e-4
  # The logits differ only through the classifier's differing input codes:
  # |d logit| <= sum_k |d code_k| * max_c |w[k, c] * step[c]|, where a weight
  # code's step is 2^acc_shift accumulator steps (s_w[c] * s_in).
  fc = graph.node("classifier")
  step = np.abs(fc.encoding.scale.astype(np.float64)) * 2.0 ** int(fc.arrays.get("acc_shift", 0))
  w_real = np.abs(fc.arrays["weight"] * step).max(axis=1)
  moved = np.abs(got[fc.inputs[0]] - env[fc.inputs[0]]) @ w_real
  diff = np.abs(got[graph.output] - logits).max(axis=1)
  assert np.all(diff <= moved + 1e-5 * np.abs(logits).max())
  assert np.mean(got[graph.output].argmax(-1) == logits.argmax(-1)) >= 0.99


def test_onnx_agrees_with_the_engine_after_a_mean(engine):
  # digits_cnn: conv -> conv -> mean -> dense on a uint8 input, which
  # onnxruntime fuses into QGemm when the int32 bias is the Gemm's input.
  deploy_build = pytest.importorskip("haqjax.deploy.build")
  scheme = QuantScheme(weight=weight_quantizer("minmax"), act=act_quantizer("static"))
  model = models.create("digits_cnn", num_classes=10, quant_scheme=scheme)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
  rng = np.random.default_rng(1)
  # Non-zero biases (initialized to zero): the bias is what was misread.
  params = variables["params"]
  params = {**params, "classifier": {**params["classifier"],
                                     "bias": jnp.asarray(rng.normal(0, 1, 10), jnp.float32)}}
  variables = {**variables, "params": params}
  images = rng.uniform(0, 1, (128, 8, 8, 1)).astype(np.float32)
  policy = Policy.create(layer_table(model, (1, 8, 8, 1)).names, 4, 4)
  variables = calibrate(model, variables, [images[:64]], policy)
  graph = deploy_build.build(model, variables, policy, images[:8])
  assert [n.op for n in graph.nodes if n.op in ("mean", "dense")] == ["mean", "dense"]
  assert np.all(graph.node("classifier").arrays["bias"] != 0)
  logits, env = engine.run(graph, images, intermediates=True)
  logits, env = np.asarray(logits), {k: np.asarray(v) for k, v in env.items()}
  got = _ort_tensors(graph, images)
  # As in test_onnx_agrees_with_the_engine: the logits differ only through
  # the classifier's differing input codes.
  fc = graph.node("classifier")
  step = np.abs(fc.encoding.scale.astype(np.float64)) * 2.0 ** int(fc.arrays.get("acc_shift", 0))
  w_real = np.abs(fc.arrays["weight"] * step).max(axis=1)
  moved = np.abs(got[fc.inputs[0]] - env[fc.inputs[0]]) @ w_real
  diff = np.abs(got[graph.output] - logits).max(axis=1)
  assert np.all(diff <= moved + 1e-5 * np.abs(logits).max())
  assert np.mean(got[graph.output].argmax(-1) == logits.argmax(-1)) >= 0.99


def test_stablehlo_of_the_engine(engine, quickstart, tmp_path):
  graph = _quickstart_graph(quickstart, "w4a4")
  sizes = onnx_export.export_all(graph, tmp_path, engine_fn=lambda x: engine.run(graph, x))
  assert set(sizes) == {"model.onnx", "model.stablehlo", "encodings.json", "weights.bin"}
  run = stablehlo.load_stablehlo(tmp_path / "export" / "model.stablehlo")
  images = quickstart[3][:5]
  np.testing.assert_array_equal(run(images), engine.run(graph, images))
