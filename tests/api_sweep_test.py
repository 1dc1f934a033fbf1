"""haqjax.sweep on a plain flax model and numpy arrays: K members, one vmapped search."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import haqjax
from haqjax import hardware
from haqjax.search.gumbel import GumbelConfig

BUDGETS = (0.3, "w4a4")
# Short searches of two candidates; no warm-up, so the logits move from step 0.
GUMBEL = GumbelConfig(gumbel_bits="2,8", gumbel_warmup_epochs=0.0, gumbel_arch_lr=0.1)
COMMON = dict(search_epochs=1, gumbel=GUMBEL, batch_size=16, eval_batch_size=32,
              finetune_epochs=0, seed=0)


class PlainNet(nn.Module):
  """A convolution and a dense layer, as a user writes them."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _arrays(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = y[:, None, None, None] - 1.0 + 0.3 * rng.standard_normal((n, 6, 6, 1))
  return x.astype(np.float32), y


def _model():
  model = PlainNet()
  return model, model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))


@pytest.fixture(scope="module")
def swept():
  model, variables = _model()
  # A 'seed' axis of the base seed: every member's key is PRNGKey(0), the
  # standalone search's, so member k is `search_policy` at budget k.
  return haqjax.sweep(model, variables, _arrays(64, 0), _arrays(32, 1),
                      test=_arrays(32, 2), budgets=BUDGETS, axes={"seed": (0,)},
                      uniform=("w8a8",), **COMMON)


def test_each_member_fits_its_own_budget(swept):
  assert [m["label"] for m in swept.members] == ["budget=0.3,seed=0", "budget=w4a4,seed=0"]
  assert swept.search["trace_counts"] == {"train": 1, "eval": 1}
  target = hardware.get_target("bismo-edge")
  layers = hardware.from_layer_table(swept.table, batch=1)
  latency = lambda w, a: float(hardware.Budget(metric="latency").cost(
      target, layers, np.asarray(w), np.asarray(a)))
  n = len(swept.table)
  limits = [0.3 * latency([8] * n, [8] * n), latency([4] * n, [4] * n)]
  for m, p, limit in zip(swept.members, swept.policies, limits):
    cost = latency(p.w_bits, p.a_bits)
    np.testing.assert_allclose([m["cost"], m["limit"]], [cost, limit], rtol=1e-9)
    assert m["fits"] and cost <= limit * (1 + 1e-9), m
    assert min(m["w_bits"] + m["a_bits"]) >= 2 and max(m["w_bits"] + m["a_bits"]) <= 8
    assert {"val_top1", "test_top1"} <= set(m)
  # The budgets bind: both members were brought within them, differently.
  assert all(m["enforced"] for m in swept.members)
  assert swept.policies[0].to_dict() != swept.policies[1].to_dict()
  assert swept.costs == [m["cost"] for m in swept.members]
  assert len(swept.test_top1) == 2 and len(swept.variables) == 2
  assert swept.uniform[0]["label"] == "w8a8"
  np.testing.assert_allclose(swept.uniform[0]["cost"], latency([8] * n, [8] * n),
                             rtol=1e-9)
  report = swept.report()
  assert "budget=w4a4,seed=0" in report and "W8A8" in report
  assert len(swept.summary().splitlines()) == 2


def test_write(swept, tmp_path):
  path = swept.write(tmp_path)
  assert path == str(tmp_path / "report.md") and "budget=0.3,seed=0" in open(path).read()
  for m, p in zip(swept.members, swept.policies):
    loaded = haqjax.load_policy(tmp_path / "policies" / f"m{m['member']:02d}.json")
    assert loaded.to_dict() == p.to_dict()
  assert (tmp_path / "plots" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((tmp_path / "results.json").read_text())["members"][1]["budget"] == (
      "latency <= 1 x w4a4")


@pytest.mark.parametrize("k", [0, 1])
def test_member_equals_the_standalone_search(swept, k):
  model, variables = _model()
  single = haqjax.search_policy(model, variables, _arrays(64, 0), _arrays(32, 1),
                                budget=BUDGETS[k], method="gumbel", **COMMON)
  assert swept.policies[k].to_dict() == single.policy.to_dict()
  assert swept.members[k]["cost"] == single.cost


@pytest.mark.parametrize("kwargs, match", [
    (dict(budgets="w4a4"), "budgets is 'w4a4'; allowed: a non-empty sequence"),
    (dict(axes={"budget": (0.5,)}), "axes has 'budget'; allowed: lambda, seed"),
    (dict(axes={"lambda": "0.1"}), "axes\\['lambda'\\] is '0.1'; allowed: a non-empty"),
    (dict(combine="grid"), "combine is 'grid'; allowed: product, zip"),
    (dict(budgets=(0.5, 0.6), axes={"lambda": (0.1, 1.0, 2.0)}, combine="zip"),
     "combine is 'zip' with lengths budget: 2, lambda: 3"),
    (dict(axes={"tau_min": (9,)}), "sweep member budget=w4a4,tau_min=9: gumbel_tau_min"),
    (dict(budgets=(0.5, [0.5])), "budgets\\[1\\]: budget is \\[0.5\\]; allowed: 'wXaY'"),
    (dict(budgets=(0.5, 0.001)), "sweep member budget=0.001: .*below the lowest cost"),
    (dict(budgets=(hardware.Budget(metric="energy", value=0.5),)),
     "budgets\\[0\\] is on energy; allowed: budgets on metric='latency'"),
])
def test_bad_arguments_are_one_clear_error(kwargs, match):
  model, variables = _model()
  with pytest.raises(ValueError, match=match):
    haqjax.sweep(model, variables, _arrays(32, 0), _arrays(16, 1), **kwargs)
