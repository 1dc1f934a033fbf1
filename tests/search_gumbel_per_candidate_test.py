"""A quantizer per candidate bit-width: calibration, the mixture, the search step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax import quant
from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import layer_table
from haqjax.nn.layers import mix
from haqjax.policy import Policy
from haqjax.policy import SoftPolicy
from haqjax.search import env
from haqjax.search.gumbel import GumbelSearch
from haqjax.search.gumbel import HParams
from haqjax.search.gumbel import candidate_rows
from haqjax.search.gumbel import candidate_tensor
from haqjax.search.gumbel.config import GumbelConfig

BITS = (2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="module")
def setup():
  scheme = quant.QuantScheme(weight=quant.weight_quantizer("lsq_mse"),
                             act=quant.act_quantizer("lsq_mse"))
  model = models.create("digits_cnn", num_classes=10, quant_scheme=scheme)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  variables = model.init(jax.random.key(1), x[:1])
  table = layer_table(model, x.shape)
  fixed = env.Fixed.create(len(table), mode="linear", first_layer_w8=True)
  wall = env.BudgetWall(hardware.get_target("bismo-edge"), hardware.from_layer_table(table),
                        hardware.Budget(metric="latency", value=0.9), min_bits=2,
                        max_bits=8, fixed=fixed)
  w_rows, a_rows = candidate_rows(BITS, fixed.w, fixed.a)
  search = GumbelSearch(model, table.names, w_rows, a_rows,
                        candidate_tensor(wall.layer_costs, w_rows, a_rows),
                        (fixed.w >= 0) | (fixed.a >= 0), per_candidate=True)
  batch = {"image": x, "label": jax.random.randint(jax.random.key(2), (16,), 0, 10)}
  stacked = calibrate_lib.calibrate_candidates(model, variables, [x[:8], x[8:]],
                                               search.calibration_policies())
  return model, variables, search, batch, stacked


def _leaves(params):
  """`{path: leaf}` of a parameter tree."""
  return {tuple(getattr(k, "key", k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _quant_params(params):
  """`{path: leaf}` of every quantizer parameter of a model's params."""
  return {k: v for k, v in _leaves(params).items()
          if {"weight_quant", "act_quant"} & set(k)}


def test_calibrate_candidates_stacks_each_policys_calibration(setup):
  model, variables, search, batch, stacked = setup
  policies = search.calibration_policies()
  assert len(policies) == len(BITS)
  got = _quant_params(stacked["params"])
  assert got, "the lsq_mse model has quantizer parameters"
  for k, policy in enumerate(policies):
    alone = _quant_params(calibrate_lib.calibrate(
        model, variables, [batch["image"][:8], batch["image"][8:]], policy)["params"])
    assert alone.keys() == got.keys()
    for key, leaf in alone.items():
      assert got[key].shape == (len(BITS), *leaf.shape), key
      np.testing.assert_array_equal(got[key][k], leaf, err_msg=str(key))
  # Steps differ across candidates: a 2-bit step is coarser than an 8-bit one.
  # (The first layer's float input is one candidate repeated.)
  for key, step in got.items():
    if key[-2:] == ("act_quant", "step"):
      row = search.a_bits[search.names.index("/".join(key[:-2]))]
      assert np.all(step[0] > step[-1]) if row[0] < row[-1] else np.all(step[0] == step[-1])
  # Parameters other than quantizers' (kernels, biases) are kept as they were.
  others = {k: v for k, v in _leaves(stacked["params"]).items() if k not in got}
  assert others.keys() == {k for k in _leaves(variables["params"]) if k not in got}
  for key, leaf in others.items():
    np.testing.assert_array_equal(leaf, _leaves(variables["params"])[key])


def test_one_hot_per_candidate_policy_equals_the_policy_calibrated_at_it(setup):
  """Each layer runs with the quantizer calibrated at its own bits."""
  model, variables, search, batch, stacked = setup
  rng = np.random.default_rng(0)
  n = len(search.names)
  w = np.where(search.fixed, search.w_bits[:, 0], rng.choice(BITS, n))
  a = np.where(search.fixed, search.a_bits[:, 0], rng.choice(BITS, n))
  policy = Policy.create(search.names, w, a)
  calibrated = calibrate_lib.calibrate(model, variables,
                                       [batch["image"][:8], batch["image"][8:]], policy)
  soft = search.eval_policy(w, a)
  assert isinstance(soft, SoftPolicy) and soft.per_candidate
  np.testing.assert_allclose(model.apply(stacked, batch["image"], policy=soft),
                             model.apply(calibrated, batch["image"], policy=policy),
                             rtol=1e-5, atol=1e-5)


def test_eval_policy_takes_the_nearest_candidate_above_missing_bits(setup):
  _, _, search, _, _ = setup
  n = len(search.names)
  free = int(np.flatnonzero(~search.fixed)[0])
  w = np.where(search.fixed, search.w_bits[:, 0], 4)
  a = np.where(search.fixed, search.a_bits[:, 0], 4)
  w[free], a[free] = 7, 1
  soft = search.eval_policy(w, a)
  w_probs, w_rows = np.asarray(soft.w_probs), np.asarray(soft.w_bits)
  a_probs, a_rows = np.asarray(soft.a_probs), np.asarray(soft.a_bits)
  assert w_probs[free].argmax() == BITS.index(8) and w_rows[free, BITS.index(8)] == 7
  assert a_probs[free].argmax() == BITS.index(2) and a_rows[free, BITS.index(2)] == 1
  chosen = np.take_along_axis(w_rows, w_probs.argmax(1)[:, None], 1)[:, 0]
  np.testing.assert_array_equal(chosen, w)
  assert len(soft) == n
  # Shared quantizers: a plain policy.
  shared = GumbelSearch(search.model, search.names, search.w_bits, search.a_bits,
                        search.tensor, search.fixed)
  assert isinstance(shared.eval_policy(w, a), Policy)
  top = shared.calibration_policies()
  np.testing.assert_array_equal(top.w_bits, search.w_bits.max(1))


def test_mixture_of_learned_steps_keeps_the_activation_scale():
  """Half-normal activations: the 2-bit candidate with its own step keeps the
  mean; with the step calibrated at 8 bits it clips three steps from zero."""
  x = jnp.abs(jax.random.normal(jax.random.key(0), (64, 32)))
  q = quant.act_quantizer("lsq_mse")
  init = q.init(x)
  per_bits = [q.calibrate(init, x, b) for b in BITS]
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *per_bits)
  bits = jnp.asarray(BITS, jnp.int32)
  two = jax.nn.one_hot(0, len(BITS))
  own = mix(q, stacked, x, bits, two, None, per_candidate=True)
  shared = mix(q, per_bits[-1], x, bits, two, None)
  np.testing.assert_allclose(own, q(per_bits[0], x, 2), rtol=1e-6)
  assert abs(float(own.mean() / x.mean()) - 1) < 0.2
  assert float(shared.mean() / x.mean()) < 0.1
  equal = jnp.full(len(BITS), 1 / len(BITS))
  assert abs(float(mix(q, stacked, x, bits, equal, None, per_candidate=True).mean()
                   / x.mean()) - 1) < 0.1


def test_search_step_one_trace_keeps_stacked_parameters(setup):
  _, _, search, batch, stacked = setup
  hp = HParams.create(hinge_weight=1.0, multiplier_init=1.0, limit=1e-4, tau0=5.0,
                      tau_min=0.5, anneal_steps=100.0, dual_lr=0.1, arch_lr=0.05,
                      weight_lr=0.01, warmup_steps=0.0, freeze_step=1e9)
  traces = []

  def step(state, batch, hp):
    traces.append(1)
    return search.train_step(state, batch, hp)

  step = jax.jit(step)
  state = search.init(jax.random.key(0), hp, stacked)
  before = _quant_params(state.params)
  for _ in range(3):
    state, metrics = step(state, batch, hp)
  assert len(traces) == 1
  after = _quant_params(state.params)
  assert all(after[k].shape == v.shape for k, v in before.items())
  assert np.isfinite(float(metrics["loss"]))
  # Every candidate's step learns from its own share of the mixture.
  moved = [np.any(np.asarray(after[k]) != np.asarray(v), axis=tuple(range(1, v.ndim)))
           for k, v in before.items() if k[-1] == "step"]
  assert np.any(np.stack(moved), axis=0).all()


def test_config_checks_the_sharing():
  assert GumbelConfig().gumbel_quantizers == "per_candidate"
  GumbelConfig(gumbel_quantizers="shared")
  with pytest.raises(ValueError, match="gumbel_quantizers='each'.*per_candidate, shared"):
    GumbelConfig(gumbel_quantizers="each")


def test_min_max_ranges_are_one_quantizer_for_every_candidate():
  """Min-max ranges do not depend on the bit-width: both searches run one network."""
  x = jax.random.normal(jax.random.key(1), (64, 32))
  q = quant.act_quantizer("static")
  init = q.init(x)
  per_bits = [q.calibrate(init, x, b) for b in BITS]
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *per_bits)
  bits = jnp.asarray(BITS, jnp.int32)
  probs = jax.nn.softmax(jnp.arange(len(BITS), dtype=jnp.float32))
  np.testing.assert_array_equal(mix(q, stacked, x, bits, probs, None, per_candidate=True),
                                mix(q, per_bits[-1], x, bits, probs, None))
