"""Tests of the integer graph's construction and validation."""

import numpy as np
import pytest

from haqjax.deploy import graph as g


def _codes(scale=0.5, zero_point=0, bits=8, signed=False):
  return g.Encoding(bits=bits, signed=signed, scale=scale, zero_point=zero_point,
                    dtype="int8" if signed else "uint8")


def _tiny():
  acc = g.Encoding(bits=32, signed=True, scale=np.full(3, 0.05, np.float32),
                   zero_point=0, dtype="int32", axis=-1)
  nodes = (
      g.Node(name="fc:in", op="quantize", inputs=("image",),
             arrays={"inv_scale": np.float32(2.0), "lo": np.int32(0), "hi": np.int32(255)},
             encoding=_codes()),
      g.Node(name="fc", op="dense", inputs=("fc:in",),
             arrays={"weight": np.ones((4, 3), np.int8),
                     "weight_scale": np.full(3, 0.1, np.float32),
                     "bias": np.zeros(3, np.int32)},
             encoding=acc),
      g.Node(name="fc:out", op="dequantize", inputs=("fc",)),
  )
  return g.Graph(nodes=nodes, input="image", output="fc:out", input_shape=(4,))


def test_builds_and_looks_up():
  graph = _tiny()
  assert graph.layers() == ("fc",)
  assert graph.encoding("fc:in").qrange == (0, 255)
  assert graph.encoding("fc").qrange == (g.INT32_MIN, g.INT32_MAX)
  assert graph.encoding("image") is None
  assert graph.node("fc").arrays["weight"].dtype == np.int8
  assert graph.static_key() == _tiny().static_key()
  with pytest.raises(ValueError, match="'nope' is not in the graph"):
    graph.node("nope")


def test_signed_grid_follows_affine_qrange():
  enc = _codes(bits=4, signed=True)
  assert enc.qrange == (-8, 7)
  assert _codes(bits=4).qrange == (0, 15)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="int16"), "dtype is 'int16'"),
    (dict(dtype="int8"), "dtype is 'int8' for an unsigned grid"),
    (dict(bits=9), "bits is 9"),
    (dict(zero_point=300), "zero_point is 300"),
    (dict(scale=-1.0), "negative"),
    (dict(scale=np.ones(3)), "axis is None"),
])
def test_encoding_rejects(kwargs, message):
  base = dict(bits=8, signed=False, scale=0.5, zero_point=0, dtype="uint8")
  with pytest.raises(ValueError, match=message):
    g.Encoding(**{**base, **kwargs})


def test_node_rejects():
  with pytest.raises(ValueError, match="op is 'sin'"):
    g.Node(name="a", op="sin", inputs=("x",))
  with pytest.raises(ValueError, match="lacks hi"):
    g.Node(name="a", op="clamp", inputs=("x",), arrays={"lo": np.int32(0)},
           encoding=_codes())
  with pytest.raises(ValueError, match="has 1 inputs; allowed: 2"):
    g.Node(name="a", op="add", inputs=("x",), arrays={"lo": 0, "hi": 1}, encoding=_codes())
  with pytest.raises(ValueError, match="needs an integer output"):
    g.Node(name="a", op="max_pool", inputs=("x",),
           attrs={"window": (2, 2), "strides": (2, 2), "padding": ((0, 0), (0, 0))})
  with pytest.raises(ValueError, match="has a float output"):
    g.Node(name="a", op="dequantize", inputs=("x",), encoding=_codes())


def test_graph_rejects_order_and_duplicates():
  nodes = _tiny().nodes
  with pytest.raises(ValueError, match="reads 'fc:in', which no earlier node"):
    g.Graph(nodes=nodes[1:], input="image", output="fc:out")
  with pytest.raises(ValueError, match="used twice"):
    g.Graph(nodes=nodes + nodes[-1:], input="image", output="fc:out")
  with pytest.raises(ValueError, match="output is 'logits'"):
    g.Graph(nodes=nodes, input="image", output="logits")
