"""Dominated candidates: widened to the widest candidate that costs no more."""

import json

import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.nn import layer_table
from haqjax.search import env
from haqjax.search.gumbel import GumbelConfig
from haqjax.search.gumbel import candidate_rows
from haqjax.search.gumbel import candidate_tensor
from haqjax.search.gumbel import search_candidates
from haqjax.search.gumbel import widen_dominated
from haqjax.search.gumbel.derive import argmax
from haqjax.search.gumbel.derive import most_probable

BITS = (2, 3, 4, 5, 6, 8)


def _rows(n, bits=BITS):
  return np.tile(np.asarray(bits), (n, 1)), np.tile(np.asarray(bits), (n, 1))


def _tensor(cost, w, a):
  """`[L, K, K]` of `cost(l, w_bits, a_bits)`."""
  n, k = w.shape
  return np.array([[[cost(l, w[l, i], a[l, j]) for j in range(k)] for i in range(k)]
                   for l in range(n)], np.float64)


def test_a_role_that_costs_nothing_keeps_only_its_widest_candidate():
  w, a = _rows(3)
  # CIM's latency: the input's bits only.
  tw, ta, tt = widen_dominated(w, a, _tensor(lambda l, wb, ab: (l + 1) * ab, w, a))
  assert (tw == 8).all() and (ta == a).all()
  # A size budget: the weights' bits only.
  sw, sa, _ = widen_dominated(w, a, _tensor(lambda l, wb, ab: (l + 1) * wb, w, a))
  assert (sw == w).all() and (sa == 8).all()
  # The costs follow the new rows; the inputs are left as they were.
  np.testing.assert_array_equal(tt, _tensor(lambda l, wb, ab: (l + 1) * ab, tw, ta))
  assert (w == np.asarray(BITS)).all()


def test_costs_that_rise_with_every_bit_keep_every_candidate():
  w, a = _rows(4)
  t = _tensor(lambda l, wb, ab: wb * ab + l, w, a)
  got = widen_dominated(w, a, t)
  for x, y in zip(got, (w, a, t)):
    np.testing.assert_array_equal(x, y)


def test_a_flat_stretch_or_a_dip_gives_way_to_its_widest_candidate():
  w, a = _rows(1)
  # Weights: 2..4 bits cost the same (one 4-bit lane), 5 costs less than 6
  # but 8 no more than 6 (a dip): 2, 3 -> 4 and 6 -> 8, 5 stays.
  wcost = {2: 4.0, 3: 4.0, 4: 4.0, 5: 5.0, 6: 8.0, 8: 8.0}
  gw, ga, _ = widen_dominated(w, a, _tensor(lambda l, wb, ab: wcost[wb] * ab, w, a))
  assert gw[0].tolist() == [4, 4, 4, 5, 8, 8] and ga[0].tolist() == list(BITS)


def test_dominance_must_hold_whatever_the_other_roles_bits():
  w, a = _rows(1, (2, 4))
  # 2-bit weights cost more than 4-bit ones with 2-bit inputs, less with 4-bit ones.
  costs = {(2, 2): 3.0, (4, 2): 2.0, (2, 4): 4.0, (4, 4): 5.0}
  gw, ga, _ = widen_dominated(w, a, _tensor(lambda l, wb, ab: costs[wb, ab], w, a))
  assert gw[0].tolist() == [2, 4] and ga[0].tolist() == [2, 4]
  # Widening one role can leave the other's candidate dominated: 2-bit
  # inputs cost as much as 4-bit ones once the weights are 4-bit only.
  costs = {(2, 2): 1.0, (4, 2): 5.0, (2, 4): 2.0, (4, 4): 5.0}
  gw, ga, _ = widen_dominated(w, a, _tensor(lambda l, wb, ab: costs[wb, ab], w, a))
  assert gw[0].tolist() == [2, 4] and ga[0].tolist() == [2, 4]
  costs = {(2, 2): 6.0, (4, 2): 5.0, (2, 4): 7.0, (4, 4): 5.0}
  gw, ga, _ = widen_dominated(w, a, _tensor(lambda l, wb, ab: costs[wb, ab], w, a))
  assert gw[0].tolist() == [4, 4] and ga[0].tolist() == [4, 4]


@pytest.fixture(scope="module")
def quickstart_layers():
  model = models.create("quickstart_cnn", num_classes=10)
  table = layer_table(model, (1, 28, 28, 1))
  return table, hardware.from_layer_table(table)


def _wall(layers, n, target, metric):
  fixed = env.Fixed.create(n, mode="linear", first_layer_w8=True)
  return env.BudgetWall(hardware.get_target(target), layers,
                        hardware.Budget(metric=metric, value=1.5, reference="w4a4"),
                        min_bits=2, max_bits=8, fixed=fixed)


def test_real_walls_widen_the_free_role_and_the_derived_policy_fits(quickstart_layers):
  table, layers = quickstart_layers
  n = len(table)
  for target, metric, free in (("cim", "latency", "w"), ("bitfusion", "size", "a"),
                               ("systolic", "energy", None)):
    wall = _wall(layers, n, target, metric)
    w0, a0 = candidate_rows(BITS, wall.fixed.w, wall.fixed.a)
    assert [x.tolist() for x in search_candidates(BITS, wall)[:2]] == [w0.tolist(),
                                                                        a0.tolist()]
    w, a, t = search_candidates(BITS, wall, undominated=True)
    np.testing.assert_allclose(t, candidate_tensor(wall.layer_costs, w, a))
    free_rows = {"w": w, "a": a}
    for role, rows in free_rows.items():
      searched = (wall.fixed.w if role == "w" else wall.fixed.a) < 0
      if role == free:
        assert (rows[searched] == 8).all()
      else:
        assert rows.tolist() == (w0 if role == "w" else a0).tolist()
    # Any probabilities give a policy within the budget, on the candidates.
    rng = np.random.default_rng(0)
    for _ in range(3):
      pw, pa = (rng.dirichlet(np.ones(len(BITS)), n) for _ in range(2))
      wb, ab = most_probable(pw, pa, w, a, wall)
      assert bool(wall.fits(wb, ab))
      assert all(wb[l] in w[l] and ab[l] in a[l] for l in range(n))


def test_a_widened_candidate_counts_every_entry_that_stands_for_it():
  w = np.array([[4, 4, 4, 5, 8, 8]])
  a = np.array([[2, 3, 4, 5, 6, 8]])
  # 4 bits hold 0.45 spread over three entries; 5 bits 0.3 in one.
  pw = np.array([[0.15, 0.15, 0.15, 0.3, 0.1, 0.15]])
  pa = np.full((1, 6), 1 / 6)
  assert argmax(pw, pa, w, a)[0].tolist() == [4]


def test_config_names_the_field_and_the_compare_variant_stamps_it():
  from experiments import families
  from experiments import recipes
  from haqjax.search.config import SearchConfig
  from haqjax.train.config import Config
  with pytest.raises(ValueError, match="gumbel_candidates='some'.*allowed: all, undominated"):
    GumbelConfig(gumbel_candidates="some")
  types = (Config, SearchConfig, GumbelConfig)
  config, search, gumbel = recipes.read_configs("quickstart_sweep_undominated", types)
  base_config, base_search, base = recipes.read_configs("quickstart_sweep", types)
  assert (config, search) == (base_config, base_search)
  assert gumbel == base.replace(gumbel_candidates="undominated")
  stamp = families.stamp_of("gumbel_undominated", base)
  assert stamp == {"gumbel_derive": base.gumbel_derive,
                   "gumbel_quantizers": base.gumbel_quantizers,
                   "gumbel_candidates": "undominated"}
  # Records from before the field existed searched every candidate.
  old = json.loads(json.dumps({"gumbel_derive": "map", "gumbel_quantizers": "per_candidate"}))
  assert families.stamped(old, families.stamp_of("gumbel", base))
  assert not families.stamped(old, stamp)
  assert families.stamped({**old, "gumbel_candidates": "undominated"}, stamp)
  assert families.search_folder("gumbel_search", gumbel) == (
      "gumbel_search_per_candidate_undominated")
  assert families.search_folder("gumbel_search", base) == "gumbel_search_per_candidate"


def test_the_argmax_of_a_search_sums_the_probabilities_of_a_repeated_candidate():
  from haqjax.search.gumbel import GumbelSearch
  w = np.array([[4, 4, 4, 5, 8, 8]])
  a = np.array([[2, 3, 4, 5, 6, 8]])
  search = GumbelSearch(None, ["l0"], w, a, np.ones((1, 6, 6)), np.zeros(1, bool))
  # Logits whose largest entry is 5 bits', while 4 bits hold more probability.
  logits = {"w": np.log(np.array([[0.2, 0.2, 0.2, 0.3, 0.05, 0.05]])),
            "a": np.zeros((1, 6))}
  assert search.derive(logits)[0].tolist() == [4]


def test_the_policy_within_the_budget_keeps_each_layers_own_candidates(quickstart_layers):
  table, layers = quickstart_layers
  n = len(table)
  wall = _wall(layers, n, "bitfusion", "latency")
  w, a = candidate_rows(BITS, wall.fixed.w, wall.fixed.a)
  # Layers whose low candidates were widened: 2 and 3 bits stand for 4 or 5.
  w[1:4, :3], a[2:5, :2] = 4, 5
  rng = np.random.default_rng(1)
  for _ in range(5):
    pw, pa = (rng.dirichlet(np.ones(len(BITS)), n) for _ in range(2))
    wb, ab = most_probable(pw, pa, w, a, wall)
    assert bool(wall.fits(wb, ab))
    assert all(wb[l] in w[l] and ab[l] in a[l] for l in range(n)), (wb, ab)
