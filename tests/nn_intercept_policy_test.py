"""The policy as data for a quantized plain-flax model, and its bad inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.nn import init_quantizers
from haqjax.nn import layer_table
from haqjax.nn import quantized
from haqjax.policy import Policy
from haqjax.policy import SoftPolicy
from haqjax.quant import MinMaxWeight
from haqjax.quant import QuantScheme
from haqjax.quant import StaticRange
from nn_intercept_testing import random_variables
from nn_intercept_testing import strip_quantizers

SHAPE = (2, 5, 4)


class Mixer(nn.Module):
  """Dense layers and a product of two activations written by hand."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, name="proj")(x)
    scores = jnp.einsum("btd,bsd->bts", h, h)  # [B, T, T]
    return nn.Dense(3, name="out")(jnp.matmul(scores, h))


@pytest.fixture(scope="module")
def setup():
  model = quantized(Mixer())
  x = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)
  variables = random_variables(model, x)
  return model, variables, x, layer_table(model, SHAPE).names


def test_names_of_hand_written_products(setup):
  *_, names = setup
  assert names == ("proj", "einsum_0", "matmul_0", "out")


def test_one_trace_serves_every_policy_and_vmap(setup):
  model, variables, x, names = setup
  traces = []

  @jax.jit
  def forward(variables, x, policy):
    traces.append(1)
    return model.apply(variables, x, policy=policy)

  rng = np.random.default_rng(1)
  policies = [Policy.create(names, rng.integers(2, 9, len(names)),
                            rng.integers(2, 9, len(names))) for _ in range(3)]
  outs = [forward(variables, x, p) for p in policies]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1])
  stacked = jax.tree.map(lambda *b: jnp.stack(b), *policies)

  @jax.jit
  def batched(variables, x, policy):
    traces.append(1)
    return jax.vmap(lambda p: model.apply(variables, x, policy=p))(policy)

  many = batched(variables, x, stacked)
  many = batched(variables, x, jax.tree.map(lambda b: b[::-1], stacked))
  assert len(traces) == 2
  for k, out in enumerate(outs[::-1]):
    np.testing.assert_allclose(many[k], out, rtol=1e-5, atol=1e-6)


def test_one_hot_soft_policy_equals_the_policy(setup):
  model, variables, x, names = setup
  policy = Policy.create(names, [8, 4, 2, 4], [2, 4, 8, 2])
  soft = SoftPolicy.from_policy(policy, bits=(2, 4, 8))
  forward = jax.jit(lambda p: model.apply(variables, x, policy=p))
  np.testing.assert_allclose(forward(soft), forward(policy), rtol=1e-5, atol=1e-6)
  assert not np.allclose(forward(soft), forward(Policy.uniform(names, 8, 8)), atol=1e-4)


def test_policy_naming_other_layers_is_one_error_line(setup):
  model, variables, x, names = setup
  policy = Policy.uniform(names[:-1] + ("decoder",), 4, 4)
  with pytest.raises(ValueError) as e:
    jax.eval_shape(lambda: model.apply(variables, x, policy=policy))
  message = str(e.value)
  assert "\n" not in message
  assert "no layers decoder" in message and "lacks the model's layers out" in message


def test_unquantized_products_are_listed_with_one_warning(caplog):
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(4, name="proj")(x)
      g = h @ jnp.swapaxes(h, -1, -2)  # The operator is not intercepted.
      up = nn.ConvTranspose(2, (2,), name="up")(h)
      return g.sum() + up.sum()

  with caplog.at_level("WARNING"):
    table = layer_table(quantized(Model()), SHAPE)
  assert table.names == ("proj",)
  floats = {op.name: op for op in table.float_ops}
  assert set(floats) == {"dot_general_0", "up/conv_general_dilated_0"}
  assert floats["dot_general_0"].macs == 5 * 4 * 5
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert "dot_general_0" in warnings[0] and "up/conv_general_dilated_0" in warnings[0]
  assert "up/conv_general_dilated_0" in table.format()


def test_train_maps_to_the_model_s_own_argument():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic=True):
      x = nn.Dense(4, name="proj")(x)
      return nn.Dropout(0.5, deterministic=deterministic)(x)

  model = quantized(Model())
  x = jnp.ones(SHAPE)
  variables = random_variables(model, x)
  rngs = {"dropout": jax.random.key(0)}
  out = lambda **kw: np.asarray(model.apply(variables, x, rngs=rngs, **kw))
  assert np.array_equal(out(train=False), out())
  assert (out(train=True) == 0).any() and not (out(train=False) == 0).any()
  with pytest.raises(ValueError, match="both given"):
    out(train=True, deterministic=True)
  with pytest.raises(ValueError, match="train_arg is 'mode'"):
    quantized(Model(), train_arg="mode")
  ignored = quantized(Model(), train_arg=None)
  assert np.array_equal(ignored.apply(variables, x, train=True), out(train=False))


def test_variables_are_the_user_s_plus_quantizer_ranges():
  scheme = QuantScheme(weight=MinMaxWeight(), act=StaticRange())
  model = quantized(Mixer(), scheme)
  x = jnp.ones(SHAPE)
  user = Mixer().init(jax.random.key(3), x)
  wrapped = model.init(jax.random.key(3), x)
  assert jax.tree.all(jax.tree.map(np.array_equal, strip_quantizers(wrapped), user))
  assert set(wrapped["params"]["einsum_0"]) == {"act_quant", "rhs_quant"}
  with pytest.raises(ValueError, match="init_quantizers"):
    model.apply(user, x)
  added = init_quantizers(model, user, x)
  assert jax.tree.structure(added) == jax.tree.structure(wrapped)
  assert added["params"]["proj"]["kernel"] is user["params"]["proj"]["kernel"]
