"""The search step: expected cost, Lagrange multiplier, schedule, traces, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.nn import layer_table
from haqjax.search import env
from haqjax.search.gumbel import GumbelSearch
from haqjax.search.gumbel import HParams
from haqjax.search.gumbel import candidate_rows
from haqjax.search.gumbel import candidate_tensor

BITS = (2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="module")
def setup():
  model = models.create("digits_cnn", num_classes=10)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  variables = model.init(jax.random.key(1), x[:1])
  table = layer_table(model, x.shape)
  target = hardware.get_target("bismo-edge")
  layers = hardware.from_layer_table(table)
  fixed = env.Fixed.create(len(table), mode="linear", first_layer_w8=True)
  wall = env.BudgetWall(target, layers, hardware.Budget(metric="latency", value=0.9),
                        min_bits=2, max_bits=8, fixed=fixed)
  w_rows, a_rows = candidate_rows(BITS, fixed.w, fixed.a)
  tensor = candidate_tensor(wall.layer_costs, w_rows, a_rows)
  batch = {"image": x, "label": jax.random.randint(jax.random.key(2), (16,), 0, 10)}
  return model, variables, table, target, layers, wall, (w_rows, a_rows, tensor,
                                                          (fixed.w >= 0) | (fixed.a >= 0)), batch


def _search(setup, **kwargs):
  model, _, table, _, _, _, (w_rows, a_rows, tensor, fixed), _ = setup
  return GumbelSearch(model, table.names, w_rows, a_rows, tensor, fixed, **kwargs)


def _hp(**changes):
  values = dict(limit=1e-4, tau0=5.0, tau_min=0.5, anneal_steps=100.0,
                dual_lr=0.1, arch_lr=0.05, weight_lr=0.01, warmup_steps=0.0,
                freeze_step=1e9)
  lam = changes.pop("lam", 1.0)  # The penalty's weight, whichever its form.
  values.update(changes, hinge_weight=lam, multiplier_init=lam)
  return HParams.create(**values)


def test_expected_cost_equals_policy_cost_at_one_hot(setup):
  _, _, table, target, layers, wall, _, _ = setup
  search = _search(setup)
  rng = np.random.default_rng(0)
  for _ in range(3):
    wi, ai = rng.integers(0, len(BITS), (2, len(table)))
    logits = {"w": 100.0 * jax.nn.one_hot(wi, len(BITS)),
              "a": 100.0 * jax.nn.one_hot(ai, len(BITS))}
    w, a = search.derive(logits)
    w, a = wall.fixed.apply(w, a)
    expected = float(search.expected_cost(logits))
    cost = float(hardware.policy_cost(target, layers, w, a, "latency"))
    np.testing.assert_allclose(expected, cost, rtol=1e-5)
    np.testing.assert_allclose(expected, wall.cost(w, a), rtol=1e-5)


def test_first_layer_is_fixed(setup):
  search = _search(setup)
  logits = {"w": jax.random.normal(jax.random.key(0), (3, len(BITS))),
            "a": jax.random.normal(jax.random.key(1), (3, len(BITS)))}
  w, a = search.derive(logits)
  assert (w[0], a[0]) == (8, 32)
  w_probs, _ = search.probabilities(logits)
  np.testing.assert_array_equal(np.asarray(w_probs[0]), np.eye(len(BITS))[0])


def test_lagrange_multiplier_rises_over_budget_and_falls_under(setup):
  _, variables, _, _, _, wall, _, batch = setup
  search = _search(setup)
  step = jax.jit(search.train_step)
  over = _hp(lam=0.5, limit=0.5 * wall.min_cost)
  state = search.init(jax.random.PRNGKey(0), over, variables)
  state, m = step(state, batch, over)
  assert float(m["cost_ratio"]) > 1
  np.testing.assert_allclose(float(state.multiplier),
                             0.5 + 0.1 * (float(m["cost_ratio"]) - 1), rtol=1e-5)
  under = _hp(lam=0.05, limit=100 * wall.reference)
  state = search.init(jax.random.PRNGKey(0), under, variables)
  state, m = step(state, batch, under)
  assert float(m["cost_ratio"]) < 1 and float(state.multiplier) == 0.0


def test_penalty_lowers_the_expected_cost(setup):
  _, variables, _, _, _, wall, _, batch = setup
  search = _search(setup, penalty="hinge")
  hp = _hp(lam=10.0, limit=1.05 * wall.min_cost)
  step = jax.jit(search.train_step)
  state = search.init(jax.random.PRNGKey(0), hp, variables)
  ratios = []
  for _ in range(15):
    state, m = step(state, batch, hp)
    ratios.append(float(m["cost_ratio"]))
  assert ratios[-1] < ratios[0]
  assert float(state.multiplier) == 10.0  # The hinge leaves the multiplier alone.


def test_absolute_penalty_prices_an_unspent_budget_and_raises_the_cost(setup):
  """TuNAS's |r - 1|: under the budget it pulls the cost up, over it down."""
  _, variables, _, _, _, wall, _, batch = setup
  search = _search(setup, penalty="absolute", relaxation="softmax")
  step = jax.jit(search.train_step)
  for limit, direction in ((3.0 * wall.reference, 1.0), (1.05 * wall.min_cost, -1.0)):
    hp = _hp(lam=10.0, limit=limit)
    state = search.init(jax.random.PRNGKey(0), hp, variables)
    trainable = {"model": state.params, "arch": state.logits}
    _, (m, _) = search.loss(trainable, state, batch, hp, jax.random.PRNGKey(1))
    np.testing.assert_allclose(float(m["penalty"]), 10.0 * abs(float(m["cost_ratio"]) - 1),
                               rtol=1e-5)
    ratios = []
    for _ in range(15):
      state, m = step(state, batch, hp)
      ratios.append(float(m["cost_ratio"]))
    assert direction * (ratios[-1] - ratios[0]) > 0, (limit, ratios)
    assert float(state.multiplier) == 10.0  # Not a Lagrangian: the multiplier stays.


@pytest.mark.parametrize("relaxation", ["softmax", "gumbel", "hard"])
def test_penalty_prices_the_mixture_the_network_runs(setup, relaxation):
  """Task loss and penalty see one distribution: the step's mixing weights."""
  _, variables, table, _, _, wall, (_, _, tensor, _), batch = setup
  search = _search(setup, relaxation=relaxation)
  hp = _hp(limit=wall.limit, tau0=0.25, tau_min=0.25)  # tau far from 1.
  state = search.init(jax.random.PRNGKey(0), hp, variables)
  rng = np.random.default_rng(1)
  logits = {r: jnp.asarray(rng.normal(0, 2, (len(table), len(BITS))), jnp.float32)
            for r in ("w", "a")}
  state = state._replace(logits=logits)
  key = jax.random.PRNGKey(7)
  trainable = {"model": state.params, "arch": logits}
  _, (metrics, _) = search.loss(trainable, state, batch, hp, key)
  # The mixing weights the loss draws (same key split as the step's).
  k_w, k_a, _ = jax.random.split(key, 3)
  from haqjax.search.gumbel import relax  # pylint: disable=g-import-not-at-top
  w_mix = search._pin(relax.relax(k_w, logits["w"], 0.25, relaxation))  # pylint: disable=protected-access
  a_mix = search._pin(relax.relax(k_a, logits["a"], 0.25, relaxation))  # pylint: disable=protected-access
  want = float(hardware.expected_from_tensor(tensor, w_mix, a_mix))
  np.testing.assert_allclose(float(metrics["expected_cost"]), want, rtol=1e-5)
  # At tau = 0.25 the untempered softmax prices another network.
  untempered = float(search.expected_cost(logits))
  assert abs(untempered - want) > 1e-3 * want
  if relaxation == "hard":  # One-hot mixtures: the cost of a discrete policy.
    w = np.asarray(search.w_bits)[np.arange(len(table)), np.argmax(w_mix, -1)]
    a = np.asarray(search.a_bits)[np.arange(len(table)), np.argmax(a_mix, -1)]
    np.testing.assert_allclose(float(metrics["expected_cost"]), wall.cost(w, a),
                               rtol=1e-5)


def test_warmup_and_freeze_keep_the_logits(setup):
  _, variables, _, _, _, _, _, batch = setup
  search = _search(setup)
  step = jax.jit(search.train_step)
  for hp in (_hp(warmup_steps=5.0), _hp(freeze_step=0.0)):
    state = search.init(jax.random.PRNGKey(0), hp, variables)
    new, m = step(state, batch, hp)
    assert float(m["arch_on"]) == 0.0
    np.testing.assert_array_equal(new.logits["w"], state.logits["w"])
    np.testing.assert_array_equal(new.multiplier, state.multiplier)
    assert not np.allclose(new.params["classifier"]["kernel"],
                           state.params["classifier"]["kernel"])
  hp = _hp()
  state = search.init(jax.random.PRNGKey(0), hp, variables)
  new, _ = step(state, batch, hp)
  assert not np.allclose(new.logits["w"][1:], 0.0)
  np.testing.assert_array_equal(new.logits["w"][0], 0.0)  # The fixed first layer.


@pytest.mark.parametrize("relaxation", ["gumbel", "hard", "softmax"])
def test_one_trace_for_every_hparams_value(setup, relaxation):
  _, variables, _, _, _, wall, _, batch = setup
  search = _search(setup, relaxation=relaxation)
  traces = []

  def step(state, batch, hp):
    traces.append(1)
    return search.train_step(state, batch, hp)

  step = jax.jit(step)
  for i, hp in enumerate([_hp(), _hp(lam=3.0, limit=2 * wall.limit, tau0=2.0, tau_min=0.1,
                                     arch_lr=0.2, warmup_steps=1.0),
                          _hp(dual_lr=0.0, weight_lr=0.1, freeze_step=3.0)]):
    state = search.init(jax.random.PRNGKey(i), hp, variables)
    for _ in range(2):
      state, _ = step(state, batch, hp)
  assert len(traces) == 1


def test_vmap_over_hparams_equals_separate_searches(setup):
  _, variables, _, _, _, wall, _, batch = setup
  search = _search(setup)
  hps = [_hp(lam=0.5, limit=wall.limit, tau0=4.0),
         _hp(lam=2.0, limit=0.7 * wall.limit, tau0=1.0, arch_lr=0.1)]
  keys = jax.random.split(jax.random.PRNGKey(7), 2)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *hps)
  states = jax.vmap(search.init, in_axes=(0, 0, None))(keys, stacked, variables)
  vstep = jax.jit(jax.vmap(search.train_step, in_axes=(0, None, 0)))
  step = jax.jit(search.train_step)
  singles = [search.init(keys[i], hps[i], variables) for i in range(2)]
  for _ in range(3):
    states, vmetrics = vstep(states, batch, stacked)
    outs = [step(singles[i], batch, hps[i]) for i in range(2)]
    singles = [o[0] for o in outs]
  for i in range(2):
    got = jax.tree.map(lambda x: x[i], states)
    for name in ("params", "logits", "multiplier", "batch_stats"):
      jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
                   getattr(got, name), getattr(singles[i], name))
    for k, v in outs[i][1].items():
      np.testing.assert_allclose(vmetrics[k][i], v, rtol=1e-4, atol=1e-5, err_msg=k)


def test_warmup_weights_do_not_depend_on_the_penalty(setup):
  _, variables, _, _, _, wall, _, batch = setup
  search = _search(setup)
  step = jax.jit(search.train_step)
  finals = []
  for hp in (_hp(lam=1.0, dual_lr=0.01, warmup_steps=10.0),
             _hp(lam=0.1, dual_lr=0.1, limit=0.5 * wall.limit, warmup_steps=10.0,
                 anneal_steps=7.0, freeze_step=50.0)):
    state = search.init(jax.random.PRNGKey(0), hp, variables)
    for _ in range(3):
      state, m = step(state, batch, hp)
    finals.append((state, m))
  (a, ma), (b, mb) = finals
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  np.testing.assert_array_equal(ma["task_loss"], mb["task_loss"])
