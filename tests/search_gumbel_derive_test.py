"""The derived policy: the most probable within the budget, or HAQ's wall; re-derived on resume."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import data as haq_data
from haqjax import hardware
from haqjax import models
from haqjax.nn import layer_table
from haqjax.search import env
from haqjax.search.gumbel import GumbelConfig
from haqjax.search.gumbel import GumbelSearch
from haqjax.search.gumbel import HParams
from haqjax.search.gumbel import candidate_rows
from haqjax.search.gumbel import candidate_tensor
from haqjax.search.gumbel import derive
from haqjax.search.gumbel import single

BITS = (2, 4, 8)


def _wall(target, metric, value, *, first_layer_w8=False):
  model = models.create("digits_cnn", num_classes=10)
  table = layer_table(model, (1, 8, 8, 1))
  fixed = env.Fixed.create(len(table), mode="linear", first_layer_w8=first_layer_w8)
  wall = env.BudgetWall(hardware.get_target(target), hardware.from_layer_table(table),
                        hardware.Budget(metric=metric, value=value, reference="w4a4"),
                        min_bits=2, max_bits=8, fixed=fixed)
  return model, table, wall


def _probs(rng, n, k, sharp=1.0):
  p = rng.dirichlet(np.full(k, sharp), size=n)
  return p / p.sum(-1, keepdims=True)


def _log_prob(w, a, w_probs, a_probs, w_rows, a_rows):
  """log p of a policy; -inf with bits that are not candidates (the wall's
  one-bit steps leave the candidate set: 8 -> 7)."""
  total = 0.0
  for l in range(len(w)):
    for bits, probs, rows in ((w, w_probs, w_rows), (a, a_probs, a_rows)):
      if bits[l] not in list(rows[l]):
        return -np.inf
      total += np.log(probs[l][list(rows[l]).index(bits[l])])
  return total


def _brute_force(w_probs, a_probs, w_rows, a_rows, wall):
  """The most probable fitting policy by enumeration (free layers only)."""
  n = len(w_rows)
  best, best_lp = None, -np.inf
  choices = [list(itertools.product(sorted(set(w_rows[l])), sorted(set(a_rows[l]))))
             for l in range(n)]
  for combo in itertools.product(*choices):
    w = np.array([c[0] for c in combo])
    a = np.array([c[1] for c in combo])
    if not wall.fits(w, a):
      continue
    lp = _log_prob(w, a, w_probs, a_probs, w_rows, a_rows)
    if lp > best_lp:
      best, best_lp = (w, a), lp
  return best, best_lp


@pytest.mark.parametrize("target,metric,value", [("bitfusion", "latency", 1.0),
                                                  ("bismo-edge", "latency", 0.8),
                                                  ("systolic", "energy", 1.0)])
def test_map_is_the_most_probable_fitting_policy(target, metric, value):
  _, table, wall = _wall(target, metric, value)
  w_rows, a_rows = candidate_rows(BITS, wall.fixed.w, wall.fixed.a)
  rng = np.random.default_rng(0)
  over = 0
  for _ in range(6):
    w_probs, a_probs = (_probs(rng, len(table), len(BITS)) for _ in range(2))
    w, a = derive.most_probable(w_probs, a_probs, w_rows, a_rows, wall)
    assert wall.fits(w, a)
    (bw, ba), best_lp = _brute_force(w_probs, a_probs, w_rows, a_rows, wall)
    lp = _log_prob(w, a, w_probs, a_probs, w_rows, a_rows)
    np.testing.assert_allclose(lp, best_lp, rtol=1e-9)
    w0, a0 = derive.argmax(w_probs, a_probs, w_rows, a_rows)
    if wall.fits(w0, a0):
      np.testing.assert_array_equal(w, w0)
      np.testing.assert_array_equal(a, a0)
    else:
      over += 1
      # The wall's policy fits too, and is never more probable.
      ww, wa = derive.derive("wall", w_probs, a_probs, w_rows, a_rows, wall)
      assert wall.fits(ww, wa)
      assert _log_prob(ww, wa, w_probs, a_probs, w_rows, a_rows) <= lp + 1e-9
  assert over  # The cases exercise the constraint, not only the argmax.


def test_map_lowers_the_least_certain_bits_where_the_wall_lowers_the_last_layers():
  """A sure 8-bit last layer over a budget that an unsure first layer can meet."""
  _, table, wall = _wall("bitfusion", "latency", 1.0)
  n = len(table)
  w_rows, a_rows = candidate_rows(BITS, wall.fixed.w, wall.fixed.a)
  sure = lambda i: np.eye(len(BITS))[i] * 0.98 + 0.02 / len(BITS)
  w_probs = np.stack([sure(2)] * n)  # 8-bit weights, sure everywhere
  a_probs = np.stack([sure(1)] * n)  # 4-bit activations, sure everywhere
  a_probs[0] = [0.05, 0.45, 0.5]  # but unsure between 4 and 8 bits on layer 0
  w0, a0 = derive.argmax(w_probs, a_probs, w_rows, a_rows)
  # Over a budget at W8 with layer 0's activations at 4 bits: only that choice moves.
  budget = hardware.Budget(metric="latency", value=wall.cost(w0, np.where(
      np.arange(n) == 0, 4, a0)) / wall.reference, reference="w4a4")
  wall = env.BudgetWall(wall.target, wall.layers, budget, min_bits=2, max_bits=8,
                        fixed=wall.fixed)
  assert not wall.fits(w0, a0)
  w, a = derive.most_probable(w_probs, a_probs, w_rows, a_rows, wall)
  np.testing.assert_array_equal(w, w0)
  np.testing.assert_array_equal(a, np.where(np.arange(n) == 0, 4, a0))
  ww, wa = derive.derive("wall", w_probs, a_probs, w_rows, a_rows, wall)
  assert (ww != w0).any() or (wa[1:] != a0[1:]).any()  # The wall moved sure bits.


def test_fixed_layers_keep_their_bits():
  _, table, wall = _wall("bismo-edge", "latency", 1.6, first_layer_w8=True)
  w_rows, a_rows = candidate_rows(BITS, wall.fixed.w, wall.fixed.a)
  rng = np.random.default_rng(1)
  w_probs, a_probs = (_probs(rng, len(table), len(BITS)) for _ in range(2))
  w_probs[0], a_probs[0] = np.eye(len(BITS))[0], np.eye(len(BITS))[0]  # pinned, as searched
  w, a = derive.most_probable(w_probs, a_probs, w_rows, a_rows, wall)
  assert w[0] == 8 and a[0] == wall.fixed.a[0]
  assert wall.fits(w, a)


def test_config_checks_the_derivation():
  assert GumbelConfig().gumbel_derive == "map"
  with pytest.raises(ValueError, match=r"^gumbel_derive='best' is not allowed; allowed: map, wall$"):
    GumbelConfig(gumbel_derive="best")


def test_finished_search_resumed_with_another_derivation_derives_again(tmp_path):
  """A search finished with the wall, resumed with 'map': its final policy is the
  most probable one of the same probabilities, and no step is trained again."""
  splits = haq_data.load("digits", val_size=200)
  model, table, wall = _wall("bismo-edge", "latency", 0.8)
  variables = model.init(jax.random.key(1), np.zeros((1, 8, 8, 1), np.float32))
  w_rows, a_rows = candidate_rows(BITS, wall.fixed.w, wall.fixed.a)
  make = lambda derivation: GumbelSearch(
      model, table.names, w_rows, a_rows, candidate_tensor(wall.layer_costs, w_rows, a_rows),
      np.zeros(len(table), bool), derivation=derivation)
  hp = HParams.create(limit=wall.limit, tau0=5.0, tau_min=0.5, anneal_steps=4.0,
                      dual_lr=0.1, arch_lr=0.3, weight_lr=0.01, warmup_steps=0.0,
                      freeze_step=1e9, hinge_weight=0.01, multiplier_init=0.01)
  common = dict(train=splits.train, val=splits.val, wall=wall, batch_size=64,
                total_steps=5, eval_batch_size=200, log_every=5, tensorboard=False,
                directory=str(tmp_path))
  fresh = lambda search: search.init(jax.random.PRNGKey(0), hp,
                                     jax.tree.map(jnp.copy, variables))
  walled = single.run(make("wall"), hp, fresh(make("wall")), **common)
  assert walled.epochs[-1]["derive"] == "wall"
  steps_before = (tmp_path / "steps.jsonl").read_text()
  again = single.run(make("map"), hp, fresh(make("map")), **common)
  assert again.trace_counts["train"] == 0  # Nothing trained.
  assert (tmp_path / "steps.jsonl").read_text() == steps_before
  last = again.epochs[-1]
  assert last["derive"] == "map"
  w, a = derive.most_probable(np.asarray(last["w_probs"]), np.asarray(last["a_probs"]),
                              w_rows, a_rows, wall)
  assert list(again.policy.w_bits) == w.tolist()
  assert list(again.policy.a_bits) == a.tolist()
  # The rewritten record is what epochs.jsonl holds.
  lines = [json.loads(l) for l in (tmp_path / "epochs.jsonl").read_text().splitlines()]
  assert lines[-1]["derive"] == "map" and lines[-1]["w_bits"] == w.tolist()
