"""Tests of the GEMM view of haqjax models, and of the cost core's imports."""

import ast
import os

import numpy as np
import pytest

from haqjax import hardware

HARDWARE = os.path.join(os.path.dirname(__file__), "..", "haqjax", "hardware")
# The only hardware modules allowed to read haqjax.nn / haqjax.models.
ADAPTERS = ("model_layers.py", "__main__.py")


@pytest.fixture(scope="module")
def mobilenet_v2():
  return hardware.from_model("mobilenet_v2", num_classes=1000, batch=1)


def test_mobilenet_v2_gemms(mobilenet_v2):
  # MobileNetV2 (Sandler et al., CVPR 2018, Table 2): a 3x3 stride-2 conv from
  # 224x224x3 to 112x112x32, then a depthwise 3x3 on 112x112x32 (32 GEMMs of
  # [112*112, 9] x [9, 1]) and a 1x1 projection to 16 channels.
  layers = mobilenet_v2
  want = {  # name: (m, n, k, groups, depthwise)
      "stem": (112 * 112, 32, 3 * 3 * 3, 1, 0),
      "block1/depthwise": (112 * 112, 1, 3 * 3, 32, 1),
      "block1/project": (112 * 112, 16, 32, 1, 0),
      "head": (7 * 7, 1280, 320, 1, 0),
      "classifier": (1, 1000, 1280, 1, 0),
  }
  for name, (m, n, k, groups, depthwise) in want.items():
    i = layers.names.index(name)
    got = [float(x[i]) for x in (layers.m, layers.n, layers.k, layers.groups,
                                 layers.depthwise)]
    assert got == [m, n, k, groups, depthwise], name
    assert float(layers.macs[i]) == groups * m * n * k, name
  assert len(layers) == 53  # HAQ's table has one row per quantizable layer.


def test_mobilenet_v2_published_totals(mobilenet_v2):
  # TF-slim's MobileNet table (tensorflow/models research/slim/nets/mobilenet/
  # README.md, mobilenet_v2_1.0_224): 300 M MACs and 3.47 M parameters, printed
  # to the shown digit; batch-norm parameters are not counted there or here.
  assert abs(float(mobilenet_v2.macs.sum()) / 1e6 - 300) < 1.0
  params = float((mobilenet_v2.weights + mobilenet_v2.biases).sum())
  assert abs(params / 1e6 - 3.47) < 0.005


def test_batch_scales_rows_only():
  one = hardware.from_model("quickstart_cnn", num_classes=10, batch=1)
  four = hardware.from_model("quickstart_cnn", num_classes=10, batch=4)
  np.testing.assert_array_equal(four.m, 4 * one.m)
  np.testing.assert_array_equal(four.macs, 4 * one.macs)
  np.testing.assert_array_equal(four.n, one.n)
  np.testing.assert_array_equal(four.k, one.k)
  np.testing.assert_array_equal(four.weights, one.weights)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(name="alexnet"), "model is 'alexnet'; allowed:"),
    (dict(name="quickstart_cnn", input_size=0), "input_size is 0"),
])
def test_from_model_errors(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    hardware.from_model(**kwargs)


def _haqjax_imports(path):
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield from (f"{node.module}.{a.name}" for a in node.names)


@pytest.mark.parametrize("module", sorted(
    f for f in os.listdir(HARDWARE) if f.endswith(".py") and f not in ADAPTERS))
def test_cost_core_reads_shapes_only(module):
  # The cost models take shape arrays; only the adapter knows haqjax.nn/models.
  bad = [name for name in _haqjax_imports(os.path.join(HARDWARE, module))
         if any(name == p or name.startswith(p + ".") for p in ("haqjax.nn", "haqjax.models"))]
  assert not bad, f"{module} imports {bad}"
