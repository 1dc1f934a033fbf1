"""Tests of the model zoo's architectures, all traced without running:
published sizes, HAQ's layer order, output shapes, policy plumbing, registry."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax import quant
from haqjax.nn import QConv
from haqjax.nn import QDense
from haqjax.nn import layer_name
from haqjax.nn import layer_table
from haqjax.policy import Policy

IMAGENET = ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")


@functools.lru_cache(maxsize=None)
def _abstract(name, num_classes, batch=1, **kwargs):
  """(model, parameter count, logits shape, layer table), traced, no FLOPs."""
  model = models.create(name, num_classes=num_classes, **kwargs)
  shape = (batch, *models.INPUT_SHAPES[name])
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x),
      jax.ShapeDtypeStruct(shape, jnp.float32))
  # As torchvision counts: weights, biases, BN scale and bias; no BN statistics.
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  return model, params, out.shape, layer_table(model, shape)


@pytest.mark.parametrize("name, num_classes, kwargs, params, layers, macs", [
    # Published: torchvision (ResNets, MobileNetV2), Keras (MobileNetV1).
    ("resnet18", 1000, {}, 11_689_512, 21, 1_814_073_344),
    ("resnet50", 1000, {}, 25_557_032, 54, 4_089_184_256),
    ("mobilenet_v1", 1000, {}, 4_231_976, 28, 568_740_352),
    ("mobilenet_v1", 1000, dict(width_mult=0.5), 1_331_592, 28, 149_497_088),
    ("mobilenet_v2", 1000, {}, 3_504_872, 53, 300_774_272),
    ("mobilenet_v2", 1000, dict(width_mult=0.5), 1_968_680, 53, 97_131_840),
    # ResNet-20 with 1x1-conv projection shortcuts (option A would be 269,722).
    ("resnet20", 10, {}, 272_474, 22, 40_813_184),
    ("resnet_small", 10, dict(depth=8), 78_042, 10, 12_501_632),
    ("mobilenet_v2_small", 10, {}, 2_236_682, 53, 87_976_448),
    ("quickstart_cnn", 10, {}, 68_698, 7, 2_481_472),
    ("digits_cnn", 10, {}, 5_178, 3, 83_264),
])
def test_parameter_counts_layers_and_macs(name, num_classes, kwargs, params, layers,
                                          macs):
  _, got_params, _, table = _abstract(name, num_classes, **kwargs)
  assert got_params == params
  assert len(table) == layers
  assert int(table.macs.sum()) == macs
  assert len(set(table.names)) == len(table.names)


def _mobilenet_v2_rows():
  """HAQ's 53 MobileNetV2 layers from the paper's table 2: (name, kind, in,
  out, kernel, stride)."""
  rows = [("stem", "conv", 3, 32, 3, 2)]
  cin, i = 32, 1
  for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
    for b in range(n):
      hidden = cin * t
      if t != 1:
        rows.append((f"block{i}/expand", "conv", cin, hidden, 1, 1))
      rows.append((f"block{i}/depthwise", "depthwise", hidden, hidden, 3,
                   s if b == 0 else 1))
      rows.append((f"block{i}/project", "conv", hidden, c, 1, 1))
      cin, i = c, i + 1
  rows.append(("head", "conv", 320, 1280, 1, 1))
  rows.append(("classifier", "dense", 1280, 1000, 1, 1))
  return rows


def _rows(table):
  return list(zip(table.names, table.kinds, table.in_channels.tolist(),
                  table.out_channels.tolist(), table.kernel_h.tolist(),
                  table.stride.tolist()))


def test_mobilenet_v2_table_is_haqs():
  table = _abstract("mobilenet_v2", 1000)[3]
  assert len(_mobilenet_v2_rows()) == 53
  assert _rows(table) == _mobilenet_v2_rows()
  assert table.in_h[0] == 224 and table.out_h[0] == 112
  assert table.in_h[-2] == 7  # The 320->1280 conv runs on the 7x7 map.
  assert table.groups[table.is_depthwise].tolist() == table.in_channels[
      table.is_depthwise].tolist()


def test_mobilenet_v1_table():
  table = _abstract("mobilenet_v1", 1000)[3]
  strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
  channels = [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
  rows = [("stem", "conv", 3, 32, 3, 2)]
  cin = 32
  for i, (c, s) in enumerate(zip(channels, strides), start=1):
    rows.append((f"block{i}/depthwise", "depthwise", cin, cin, 3, s))
    rows.append((f"block{i}/pointwise", "conv", cin, c, 1, 1))
    cin = c
  rows.append(("classifier", "dense", 1024, 1000, 1, 1))
  assert _rows(table) == rows


def test_width_multiplier_rounds_to_eight():
  table = _abstract("mobilenet_v2", 1000, width_mult=0.35)[3]
  assert np.all(table.out_channels[:-1] % 8 == 0)
  assert table.out_channels[0] == 16  # make_divisible(32 * 0.35) = 16.
  assert table.out_channels[-2] == 1280  # Scaled only when width_mult > 1.
  assert _abstract("mobilenet_v2", 1000, width_mult=1.4)[3].out_channels[-2] == 1792
  assert models.make_divisible(32 * 0.35) == 16
  assert models.make_divisible(24 * 0.75) == 24  # Never loses more than 10%.


@pytest.mark.parametrize("name, downsample, conv1_stride, conv2_stride", [
    ("resnet18", (64, 128), 2, 1),
    ("resnet50", (256, 512), 1, 2),  # v1.5: the stride is on the 3x3 conv.
])
def test_resnet_tables(name, downsample, conv1_stride, conv2_stride):
  table = _abstract(name, 1000)[3]
  rows = {r["name"]: r for r in table.rows()}
  assert table.names[0] == "stem" and table.names[-1] == "fc"
  assert (rows["stem"]["kernel_h"], rows["stem"]["stride"], rows["stem"]["out_h"]) == (7, 2, 112)
  assert rows["layer1_0/conv1"]["in_h"] == 56  # After the 3x3/2 max pool.
  ds = rows["layer2_0/downsample"]
  assert (ds["in_channels"], ds["out_channels"], ds["stride"], ds["kernel_h"]) == (
      *downsample, 2, 1)
  assert rows["layer2_0/conv1"]["stride"] == conv1_stride
  assert rows["layer2_0/conv2"]["stride"] == conv2_stride
  assert rows["fc"]["in_channels"] == (512 if name == "resnet18" else 2048)


def test_resnet20_uses_projection_shortcuts():
  table = _abstract("resnet20", 10)[3]
  downsample = [r for r in table.rows() if r["name"].endswith("downsample")]
  assert [(r["name"], r["in_channels"], r["out_channels"], r["stride"])
          for r in downsample] == [("layer2_0/downsample", 16, 32, 2),
                                   ("layer3_0/downsample", 32, 64, 2)]
  assert table.out_h[-2] == 8


def test_quickstart_layers():
  table = _abstract("quickstart_cnn", 10)[3]
  assert table.names == ("stem", "conv1", "conv2", "conv3", "conv4", "conv5",
                         "classifier")
  assert table.kernel_h.tolist() == [3, 3, 3, 1, 3, 1, 1]
  assert table.out_h.tolist() == [14, 14, 7, 7, 4, 4, 1]


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_output_shape(name):
  assert _abstract(name, 1000)[2] == (1, 1000)


@pytest.mark.parametrize("name, shape, kwargs, logits_shape", [
    ("mobilenet_v2_small", (2, 28, 28, 1), {}, (2, 10)),
    ("resnet_small", (2, 32, 32, 3), {}, (2, 10)),
    ("quickstart_cnn", (3, 56, 56, 1), dict(width_mult=0.5), (3, 10)),
])
def test_small_models_take_other_input_sizes(name, shape, kwargs, logits_shape):
  model = models.create(name, num_classes=10, **kwargs)
  out, _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                          jax.ShapeDtypeStruct(shape, jnp.float32))
  assert out.shape == logits_shape


@pytest.mark.parametrize("name", models.MODELS)
def test_every_layer_is_called_with_the_policy(name):
  """Each haqjax layer is called once, in table order, with the model's policy."""
  num_classes = 1000 if name in IMAGENET else 10
  model, _, _, table = _abstract(name, num_classes)
  policy = Policy.uniform(table.names, 4, 4)
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name == "__call__"
        and isinstance(context.module, (QConv, QDense))):
      given = args[1] if len(args) > 1 else kwargs.get("policy")
      calls.append((layer_name(context.module), given is policy))
    return next_fun(*args, **kwargs)

  def init(x):
    with nn.intercept_methods(interceptor):
      return model.init(jax.random.key(0), x, policy)

  jax.eval_shape(init, jax.ShapeDtypeStruct((1, *models.INPUT_SHAPES[name]),
                                            jnp.float32))
  assert calls == [(n, True) for n in table.names]


def test_registry_builds_every_model():
  assert set(models.MODELS) == set(models.INPUT_SHAPES)
  assert isinstance(models.create("mobilenet_v2", num_classes=10, width_mult=0.5),
                    models.MobileNetV2)
  assert isinstance(models.create("resnet50", num_classes=10), models.ResNet)
  assert isinstance(models.create("resnet_small", num_classes=10, depth=14),
                    models.CifarResNet)


# Each model's own fields, in constructor order; the ZooModel fields follow.
OWN_FIELDS = {
    models.DigitsCNN: ("num_classes", "width"),
    models.QuickstartCNN: ("num_classes", "width_mult"),
    models.MobileNetV1: ("num_classes", "width_mult"),
    models.MobileNetV2: ("num_classes", "width_mult", "stem_strides", "stage_strides",
                         "dropout_rate", "clip_relu"),
    models.ResNet: ("stage_sizes", "block", "num_classes", "width"),
    models.CifarResNet: ("stage_sizes", "num_classes", "widths"),
}
ZOO_FIELDS = ("dtype", "quant_scheme", "fold_bn", "freeze_bn_stats")


@pytest.mark.parametrize("cls", list(OWN_FIELDS), ids=lambda c: c.__name__)
def test_models_take_their_own_fields_then_the_zoo_fields(cls):
  assert issubclass(cls, models.ZooModel)
  fields = [f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
  own = tuple(f.name for f in fields if not f.kw_only)
  assert own == OWN_FIELDS[cls]
  assert {f.name for f in fields if f.kw_only} == set(ZOO_FIELDS)


def test_every_model_takes_the_zoo_fields():
  scheme = quant.QuantScheme(weight=quant.LSQ(), act=quant.PACT())
  options = dict(quant_scheme=scheme, fold_bn=True, freeze_bn_stats=True)
  for name in models.MODELS:
    model = models.create(name, num_classes=10, dtype=jnp.bfloat16, **options)
    assert isinstance(model, models.ZooModel)
    assert model.dtype == jnp.bfloat16
    assert {k: getattr(model, k) for k in options} == options
    plain = models.create(name, num_classes=10)
    assert (plain.dtype, plain.quant_scheme, plain.fold_bn,
            plain.freeze_bn_stats) == (jnp.float32, None, False, False)


@pytest.mark.parametrize("name, kwargs, message", [
    ("vgg16", dict(num_classes=10), "model 'vgg16' is unknown; allowed: digits_cnn, "),
    ("mobilenet_v2", dict(num_classes=10, width_mult=0), "width_mult is 0; allowed: a positive"),
    ("mobilenet_v1", dict(num_classes=10, width_mult=-0.5), "width_mult is -0.5"),
    ("quickstart_cnn", dict(num_classes=10, width_mult="1"), "width_mult is '1'"),
    ("resnet18", dict(num_classes=10, width_mult=0.5),
     "model 'resnet18' does not take width_mult; allowed: dtype"),
    ("resnet_small", dict(num_classes=10, depth=21), r"depth is 21; allowed: 6n\+2"),
    ("resnet20", dict(num_classes=0), "num_classes is 0; allowed: a positive integer"),
    ("resnet20", dict(num_classes=2.5), "num_classes is 2.5"),
])
def test_registry_errors(name, kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.create(name, **kwargs)
