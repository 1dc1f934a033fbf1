"""NNX models quantized by interception: the linen path's tables, outputs and traces."""

import functools

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import layer_table
from haqjax.nn import nnx_quantized
from haqjax.nn import nnx_variables
from haqjax.nn import quantized
from haqjax.policy import Policy
from haqjax.quant import MinMaxActivation
from haqjax.quant import MinMaxWeight
from haqjax.quant import QuantRule
from haqjax.quant import QuantScheme
from haqjax.quant import StaticRange
from nn_intercept_testing import DIM
from nn_intercept_testing import HEADS
from nn_intercept_testing import TOKENS
from nn_intercept_testing import Encoder
from nn_intercept_testing import random_variables

IMAGES = (2, 8, 8, 3)
SEQUENCE = (2, TOKENS, 4)


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.Conv(8, (3, 3), strides=2, feature_group_count=8, name="dw")(x)
    return nn.Dense(4, name="head")(x.mean((1, 2)))


class NnxCNN(nnx.Module):
  """The same network in NNX: a convolution, BN, a depthwise one and a head."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.dw = nnx.Conv(8, 8, (3, 3), strides=2, feature_group_count=8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    return self.head(self.dw(x).mean((1, 2)))


class NnxEncoder(nnx.Module):
  """`nn_intercept_testing.Encoder` in NNX, with the same attribute names."""

  def __init__(self, rngs):
    self.embed = nnx.Linear(4, DIM, rngs=rngs)
    self.ln1 = nnx.LayerNorm(DIM, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(DIM, rngs=rngs)
    self.mlp = nnx.Linear(DIM, DIM, rngs=rngs)
    self.head = nnx.Linear(DIM, 3, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    x = x + self.attention(self.ln1(x))
    x = x + self.mlp(nnx.gelu(self.ln2(x)))
    return self.head(jnp.mean(x, axis=1))


class Mixer(nnx.Module):
  """Products of two activations written by hand in the user's module."""

  def __init__(self, rngs):
    self.proj = nnx.Linear(4, 6, rngs=rngs)
    self.out = nnx.Einsum("btd,df->btf", (6, 3), rngs=rngs)

  def __call__(self, x):
    h = self.proj(x)
    scores = jnp.einsum("btd,bsd->bts", h, h)  # [B, T, T]
    return self.out(jnp.matmul(scores, h))


def _pair(linen_model, nnx_cls, shape, scheme=None):
  """`(linen wrapped, NNX wrapped, shared numpy-drawn variables, input)`."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  lq = quantized(linen_model, scheme)
  variables = random_variables(lq, x)
  return lq, nnx_quantized(nnx_cls(nnx.Rngs(0)), scheme), variables, x


@pytest.fixture(scope="module")
def cnn():
  return _pair(LinenCNN(), NnxCNN, IMAGES)


@pytest.fixture(scope="module")
def encoder():
  return _pair(Encoder(), NnxEncoder, SEQUENCE)


@functools.partial(jax.jit, static_argnames="model")
def run(model, variables, x, policy):
  return model.apply(variables, x, policy=policy, train=False)


def _mixed(names, seed):
  rng = np.random.default_rng(seed)
  return Policy.create(names, rng.integers(2, 9, len(names)), rng.integers(2, 9, len(names)))


@pytest.mark.parametrize("which", ["cnn", "encoder"])
def test_table_and_variables_equal_the_linen_model_s(which, request):
  lq, nq, variables, x = request.getfixturevalue(which)
  linen_table, table = layer_table(lq, x.shape), layer_table(nq, x.shape)
  assert table.rows() == linen_table.rows()
  assert table.float_ops == linen_table.float_ops == ()
  shapes = jax.eval_shape(lambda x: nq.init(jax.random.key(0), x, train=False), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables)


def test_cnn_table_kinds(cnn):
  _, nq, _, x = cnn
  table = layer_table(nq, x.shape)
  assert table.names == ("conv1", "dw", "head")
  assert table.kinds == ("conv", "depthwise", "dense")
  assert list(table.macs) == [8 * 8 * 27 * 8, 4 * 4 * 9 * 8, 8 * 4]


def test_encoder_table_lists_the_attention_matmuls(encoder):
  _, nq, _, x = encoder
  table = layer_table(nq, x.shape)
  assert table.names == ("embed", "attention/query", "attention/key", "attention/value",
                         "attention/qk", "attention/pv", "attention/out", "mlp", "head")
  assert table.kinds == ("dense",) * 4 + ("matmul",) * 2 + ("dense",) * 3


@pytest.mark.parametrize("which", ["cnn", "encoder"])
def test_quantized_outputs_equal_the_linen_model_s(which, request):
  lq, nq, variables, x = request.getfixturevalue(which)
  names = layer_table(lq, x.shape).names
  float_out = run(nq, variables, x, None)
  np.testing.assert_allclose(float_out, run(lq, variables, x, None), rtol=1e-5, atol=1e-5)
  for policy in (Policy.uniform(names, 4, 4), _mixed(names, 1)):
    out = run(nq, variables, x, policy)
    np.testing.assert_allclose(out, run(lq, variables, x, policy), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out) - np.asarray(float_out)).max() > 1e-3


def test_training_mode_updates_batch_stats_as_linen(cnn):
  lq, nq, variables, x = cnn
  policy = Policy.uniform(layer_table(lq, x.shape).names, 8, 8)
  apply = jax.jit(lambda m, v: m.apply(v, x, policy=policy, train=True,
                                        mutable=["batch_stats"]), static_argnums=0)
  (out, new), (linen_out, linen_new) = apply(nq, variables), apply(lq, variables)
  np.testing.assert_allclose(out, linen_out, rtol=1e-5, atol=1e-5)
  mean = new["batch_stats"]["bn1"]["mean"]
  np.testing.assert_allclose(mean, linen_new["batch_stats"]["bn1"]["mean"], rtol=1e-5, atol=1e-6)
  assert not np.allclose(mean, variables["batch_stats"]["bn1"]["mean"])


def test_one_trace_serves_every_policy_and_vmap(cnn):
  _, nq, variables, x = cnn
  names = layer_table(nq, x.shape).names
  traces = []

  @jax.jit
  def forward(variables, x, policy):
    traces.append(1)
    return nq.apply(variables, x, policy=policy, train=False)

  policies = [_mixed(names, seed) for seed in range(3)]
  outs = [forward(variables, x, p) for p in policies]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1])
  stacked = jax.tree.map(lambda *b: jnp.stack(b), *policies)

  @jax.jit
  def batched(variables, x, policy):
    traces.append(1)
    return jax.vmap(lambda p: nq.apply(variables, x, policy=p, train=False))(policy)

  many = batched(variables, x, stacked)
  assert len(traces) == 2
  for k, out in enumerate(outs):
    np.testing.assert_allclose(many[k], out, rtol=1e-5, atol=1e-6)


def test_products_in_the_user_s_module():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 4)), jnp.float32)
  model = Mixer(nnx.Rngs(0))
  nq = nnx_quantized(model)
  table = layer_table(nq, x.shape)
  assert table.names == ("proj", "einsum_0", "matmul_0", "out")
  assert table.kinds == ("dense", "matmul", "matmul", "dense")
  variables = nnx_variables(model)
  want = jax.jit(lambda x: model(x))(x)  # The user's own NNX forward pass.
  np.testing.assert_allclose(run(nq, variables, x, None), want, rtol=1e-5, atol=1e-5)
  base = Policy.uniform(table.names, 8, 8)
  out = run(nq, variables, x, base)
  for i in (1, 2):  # Each hand-written product takes its own bits.
    bits = np.array(base.a_bits)
    bits[i] = 2
    changed = run(nq, variables, x, base.replace(a_bits=jnp.asarray(bits)))
    assert np.abs(np.asarray(changed) - np.asarray(out)).max() > 1e-4


def test_policy_naming_other_layers_is_one_error_line(cnn):
  _, nq, variables, x = cnn
  policy = Policy.uniform(("conv1", "dw", "decoder"), 4, 4)
  with pytest.raises(ValueError) as e:
    jax.eval_shape(lambda: nq.apply(variables, x, policy=policy, train=False))
  message = str(e.value)
  assert "\n" not in message
  assert "no layers decoder" in message and "lacks the model's layers head" in message


def test_rules_and_calibration_on_nnx_paths(encoder):
  _, _, variables, x = encoder
  scheme = QuantScheme(weight=MinMaxWeight(), act=MinMaxActivation(),
                       rules=(QuantRule(pattern="attention/(qk|pv)",
                                        act=StaticRange(sign="signed")),))
  lq, nq = quantized(Encoder(), scheme), nnx_quantized(NnxEncoder(nnx.Rngs(0)), scheme)
  params = jax.eval_shape(nq.init, jax.random.key(0), x)["params"]
  assert set(params["attention"]["qk"]) == set(params["attention"]["pv"]) == {
      "act_quant", "rhs_quant"}
  assert "act_quant" not in params["attention"]["query"]
  user = {k: v for k, v in variables.items()}
  linen_vars = random_variables(lq, x)
  names = layer_table(nq, x.shape).names
  policy = Policy.uniform(names, 6, 6)
  calibrate_lib.clear_calibrators()
  got = calibrate_lib.calibrate(nq, linen_vars, [x], policy)
  want = calibrate_lib.calibrate(lq, user | linen_vars, [x], policy)
  for op in ("qk", "pv"):
    for role in ("act_quant", "rhs_quant"):
      for field, value in want["params"]["attention"][op][role].items():
        np.testing.assert_allclose(got["params"]["attention"][op][role][field], value,
                                   rtol=1e-5)
  assert float(got["params"]["attention"]["qk"]["rhs_quant"]["hi"].max()) > 0.0


def test_list_paths_and_float_ops_are_named_as_in_linen(caplog):
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
      return self.lin(x)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([Block(rngs), Block(rngs)])
      self.up = nnx.ConvTranspose(4, 2, (2,), rngs=rngs)

    def __call__(self, x):
      for block in self.blocks:
        x = block(x)
      return self.up(x)

  with caplog.at_level("WARNING"):
    table = layer_table(nnx_quantized(Net(nnx.Rngs(0))), (1, 3, 4))
  assert table.names == ("blocks/0/lin", "blocks/1/lin")
  assert [op.name for op in table.float_ops] == ["up/conv_general_dilated_0"]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "up/conv_general_dilated_0" in warnings[0]
