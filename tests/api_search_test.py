"""haqjax.search_policy on a plain flax model with attention, and on a haqjax model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import haqjax
from haqjax import hardware
from haqjax.nn import QConv
from haqjax.nn import QDense
from haqjax.search.hawq.config import HawqConfig


class TinyViT(nn.Module):
  """Patch embedding, one attention block and a head, as a user writes them."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=3, padding="VALID")(x)  # 2x2 patches of 3x3
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(y, y)
    x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))
    return nn.Dense(3)(x.mean(axis=1))


class HaqNet(nn.Module):
  """The same sizes from haqjax layers (called with a policy)."""

  @nn.compact
  def __call__(self, x, policy=None, train: bool = False):
    x = nn.relu(QConv(4, (3, 3), strides=2, name="conv")(x, policy))
    return QDense(3, name="fc")(x.reshape(x.shape[0], -1), policy)


def _arrays(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = y[:, None, None, None] - 1.0 + 0.3 * rng.standard_normal((n, 6, 6, 1))
  return x.astype(np.float32), y


@pytest.fixture(scope="module")
def vit_result():
  model = TinyViT()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
  return model, haqjax.search_policy(
      model, variables, _arrays(64, 0), _arrays(32, 1), test=_arrays(32, 2),
      method="rl", episodes=3, episode_steps=2, batch_size=16, finetune_epochs=0.5,
      budget="w4a4", uniform=("w8a8", "w4a4"), eval_batch_size=32)


def test_rl_search_covers_the_attention_matmuls(vit_result):
  model, result = vit_result
  names = result.policy.names
  assert names == result.table.names
  assert "MultiHeadDotProductAttention_0/qk" in names
  assert "MultiHeadDotProductAttention_0/pv" in names
  assert result.table.kinds[names.index("MultiHeadDotProductAttention_0/qk")] == "matmul"
  assert result.search["episodes"] == 3 and len(result.search["records"]) == 3
  assert result.fits and result.cost <= result.limit * (1 + 1e-9)


def test_costs_are_the_hardware_models(vit_result):
  _, result = vit_result
  target = hardware.get_target("bismo-edge")
  layers = hardware.from_layer_table(result.table, batch=1)
  w, a = np.asarray(result.policy.w_bits), np.asarray(result.policy.a_bits)
  direct = hardware.Budget(metric="latency").cost(target, layers, w, a)
  np.testing.assert_allclose(result.cost, float(direct), rtol=1e-12)
  points = {u["label"]: u for u in result.uniform}
  assert points["w8a8"]["cost"] > points["w4a4"]["cost"]
  np.testing.assert_allclose(points["w4a4"]["cost"], result.limit, rtol=1e-12)
  assert {"val_top1", "test_top1"} <= set(points["w8a8"])


def test_the_integer_model_says_why_it_is_not_built(vit_result):
  _, result = vit_result
  assert result.integer["top1"] is None
  assert result.integer["reason"].startswith("ValueError: deploy")
  report = result.report()
  assert "MultiHeadDotProductAttention_0/qk" in report and "uniform W4A4" in report
  assert "not built" in report and result.summary().startswith("rl on bismo-edge")


def test_hawq_on_a_haqjax_model():
  model = HaqNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
  result = haqjax.search_policy(
      model, variables, _arrays(64, 0), _arrays(32, 1), method="hawq", batch_size=16,
      finetune_epochs=0, budget=0.99, metric="energy", target="bitfusion",
      hawq=HawqConfig(hawq_bits="2,4,8", hawq_probes=1, hawq_max_iterations=1,
                      hawq_batches=1), eval_batch_size=32)
  assert result.policy.names == ("conv", "fc") and result.fits
  assert result.budget == "energy <= 0.99 x w8a8"
  assert set(np.asarray(result.policy.w_bits).tolist()) <= {2, 4, 8}
  assert len(result.search["weight_traces"]) == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="evolution"), "method is 'evolution'; allowed: gumbel, rl, hawq"),
    (dict(budget=[0.5]), "budget is \\[0.5\\]; allowed: 'wXaY'"),
    (dict(budget="w9a9"), "Budget.reference is 'w9a9'"),
    (dict(uniform=("fp32",)), "uniform has 'fp32'"),
])
def test_bad_arguments_are_one_clear_error(kwargs, match):
  model = TinyViT()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
  with pytest.raises(ValueError, match=match):
    haqjax.search_policy(model, variables, _arrays(32, 0), _arrays(16, 1), **kwargs)
