"""HAWQ allocation: the ILP against exhaustive enumeration, and its baselines."""

import itertools

import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.hardware.budget import TABLE_BITS
from haqjax.hardware.budget import table_index
from haqjax.hardware.budget import within
from haqjax.search.hawq import greedy
from haqjax.search.hawq import ilp
from haqjax.nn import layer_table
from haqjax.search.hawq.problem import Problem

BITS = (2, 4, 8)
L = 5


def _tables(seed, structured):
  """`(omega, cost)` `[L, 9, 9]`: HAWQ-like (noise falling 4x per bit, cost
  growing with bits) or arbitrary positive numbers."""
  rng = np.random.default_rng(seed)
  b = np.asarray(TABLE_BITS, np.float64)
  if structured:
    tw, ta = rng.uniform(0.1, 10, (2, L, 1, 1))
    omega = tw * 4.0 ** -b[None, :, None] + ta * 4.0 ** -b[None, None, :]
    macs = rng.uniform(1, 20, (L, 1, 1))
    cost = macs * b[None, :, None] * b[None, None, :] * rng.uniform(0.9, 1.1, (L, 9, 9))
  else:
    omega, cost = rng.uniform(0, 1, (2, L, 9, 9))
  return omega, cost * 1e-6  # Seconds: the solver must not depend on the unit.


def _brute(problem, allowed_groups=None, monotone=None):
  """Least Omega over every allocation within the limit, enumerated."""
  idx = table_index(list(BITS))
  pairs = list(itertools.product(idx, idx))
  best = np.inf
  rows = np.arange(L)
  for config in itertools.product(range(len(pairs)), repeat=L):
    w = np.array([pairs[c][0] for c in config])
    a = np.array([pairs[c][1] for c in config])
    if allowed_groups and any(len({config[l] for l in g}) > 1 for g in allowed_groups):
      continue
    if monotone is not None and not monotone(w, a):
      continue
    if within(problem.cost[rows, w, a].sum(), problem.limit):
      best = min(best, problem.omega[rows, w, a].sum())
  return best


@pytest.mark.parametrize("seed, structured", [(0, True), (1, True), (2, False)])
def test_ilp_is_optimal(seed, structured):
  omega, cost = _tables(seed, structured)
  base = Problem.create([f"l{i}" for i in range(L)], omega, cost, 1.0, w_bits=BITS,
                        a_bits=BITS)
  low, high = ilp.budget_grid(base, 2)
  for frac in (0.0, 0.1, 0.3, 0.6, 0.95):
    problem = base.with_limit(low + frac * (high - low))
    policy = ilp.solve(problem)
    got, spent = problem.evaluate(policy)
    assert within(spent, problem.limit)
    assert set(np.asarray(policy.w_bits)) <= set(BITS)
    np.testing.assert_allclose(got, _brute(problem), rtol=1e-9)
    if frac == 0.0:
      assert spent == pytest.approx(low, rel=1e-12)


def test_ties_and_fixed_layers():
  omega, cost = _tables(3, True)
  fixed_w = np.array([8, -1, -1, -1, 8])
  fixed_a = np.array([32, -1, -1, -1, 8])
  omega[:, :, table_index(32)] = 0.0  # Float input: no activation error.
  base = Problem.create([f"l{i}" for i in range(L)], omega, cost, 1.0, w_bits=BITS,
                        a_bits=BITS, fixed_w=fixed_w, fixed_a=fixed_a, ties=[(1, 3)])
  low, high = ilp.budget_grid(base, 2)
  problem = base.with_limit(low + 0.4 * (high - low))
  policy = ilp.solve(problem)
  w, a = np.asarray(policy.w_bits), np.asarray(policy.a_bits)
  assert (w[0], a[0], w[4], a[4]) == (8, 32, 8, 8)
  assert (w[1], a[1]) == (w[3], a[3])
  # Exhaustive check over the free layers with the tie and the fixed bits.
  rows = np.arange(L)
  idx = table_index(list(BITS))
  best = np.inf
  for (w1, a1), (w2, a2) in itertools.product(itertools.product(idx, idx), repeat=2):
    wi = np.array([table_index(8), w1, w2, w1, table_index(8)])
    ai = np.array([table_index(32), a1, a2, a1, table_index(8)])
    if within(cost[rows, wi, ai].sum(), problem.limit):
      best = min(best, omega[rows, wi, ai].sum())
  np.testing.assert_allclose(problem.evaluate(policy)[0], best, rtol=1e-9)


def test_infeasible_budget_is_one_line():
  omega, cost = _tables(4, True)
  problem = Problem.create([f"l{i}" for i in range(L)], omega, cost, 1.0, w_bits=BITS,
                           a_bits=BITS, label="latency <= 0.01 x w8a8", unit="s")
  low = problem.min_cost()
  with pytest.raises(ValueError) as e:
    ilp.solve(problem.with_limit(0.5 * low, "latency <= 0.01 x w8a8"))
  message = str(e.value)
  assert "\n" not in message and "latency <= 0.01 x w8a8" in message
  assert f"minimum achievable cost {low:.6g} s" in message
  for solve in (greedy.solve, lambda p: ilp.solve_monotone(p, np.ones(L), np.ones(L))):
    with pytest.raises(ValueError, match="minimum achievable cost"):
      solve(problem.with_limit(0.5 * low))


@pytest.mark.parametrize("target", ["bitfusion", "bismo-edge"])
def test_ilp_is_optimal_at_limits_equal_to_an_allocations_cost(target):
  # Hardware costs are discrete (Bit Fusion's latency is the same for 3 and
  # 4 bits), so the best allocation often costs exactly the limit, e.g. one
  # that spends a uniform policy's budget to the last cycle. The solver's
  # presolve must not cut such an allocation off at the float64 bound.
  model = models.create("digits_cnn", num_classes=10)
  table = layer_table(model, (1, 8, 8, 1))
  cost = hardware.Budget(metric="latency", value=1.0).table(
      hardware.get_target(target), hardware.from_layer_table(table))
  n = len(table)
  rng = np.random.default_rng(0)
  idx = table_index(list(BITS))
  pairs = list(itertools.product(idx, idx))
  for _ in range(20):
    omega = np.zeros((n, 9, 9))  # Separable, as -log p of a search's probabilities.
    omega[:, idx[:, None], idx[None, :]] = -np.log(
        rng.dirichlet(np.ones(3), n)[:, :, None] * rng.dirichlet(np.ones(3), n)[:, None, :])
    limit = cost[np.arange(n), table_index(4), table_index(4)].sum()  # Uniform W4A4's.
    problem = Problem.create(table.names, omega, cost, limit, w_bits=BITS, a_bits=BITS)
    got, spent = problem.evaluate(ilp.solve(problem))
    assert within(spent, limit)
    best = min(sum(omega[l, pairs[c][0], pairs[c][1]] for l, c in enumerate(config))
               for config in itertools.product(range(len(pairs)), repeat=n)
               if within(sum(cost[l, pairs[c][0], pairs[c][1]]
                             for l, c in enumerate(config)), limit))
    np.testing.assert_allclose(got, best, rtol=1e-9)


def test_a_budget_of_exactly_one_allocation_holds_it():
  omega, cost = _tables(5, True)
  problem = Problem.create([f"l{i}" for i in range(L)], omega, cost, 1.0, w_bits=BITS,
                           a_bits=BITS)
  rows = np.arange(L)
  uniform = cost[rows, table_index(4), table_index(4)].sum()
  policy = ilp.solve(problem.with_limit(uniform))
  got, spent = problem.evaluate(policy)
  assert within(spent, uniform)
  assert got <= omega[rows, table_index(4), table_index(4)].sum() * (1 + 1e-12)


def test_costs_closer_than_the_solver_tolerance_at_the_lowest_limit():
  # Costs nearly flat in the bits (a memory-bound target): choices differ by
  # a few 1e-8 of the total, under HiGHS's feasibility tolerance, so its
  # answers may exceed a limit at the lowest cost, and a bound lowered by
  # that tolerance holds no allocation at all.
  rng = np.random.default_rng(7)
  b = np.asarray(TABLE_BITS, np.float64)
  cost = 1e-5 * (1.0 + 1e-8 * (b[None, :, None] + b[None, None, :])
                 * rng.uniform(0.5, 1.5, (L, 9, 9)))
  omega = np.broadcast_to(4.0 ** -b[None, :, None] + 4.0 ** -b[None, None, :], (L, 9, 9))
  problem = Problem.create([f"l{i}" for i in range(L)], omega * rng.uniform(0.5, 2, (L, 1, 1)),
                           cost, 1.0, w_bits=BITS, a_bits=BITS)
  lowest = problem.with_limit(problem.min_cost())
  policy = ilp.solve(lowest)
  assert lowest.fits(policy)
  # The cheapest allocation is the one there is (up to ties in cost).
  assert lowest.evaluate(policy)[1] == pytest.approx(problem.min_cost(), rel=1e-12)


def test_monotone_is_the_best_trace_ordered_allocation():
  omega, cost = _tables(6, True)
  rng = np.random.default_rng(6)
  w_traces, a_traces = rng.uniform(0, 1, (2, L))
  base = Problem.create([f"l{i}" for i in range(L)], omega, cost, 1.0, w_bits=BITS,
                        a_bits=BITS)
  b = np.asarray(TABLE_BITS)

  def ordered(w, a):
    return (np.all(np.diff(b[w][np.argsort(w_traces)]) >= 0)
            and np.all(np.diff(b[a][np.argsort(a_traces)]) >= 0))

  low, high = ilp.budget_grid(base, 2)
  for frac in (0.05, 0.3, 0.7):
    problem = base.with_limit(low + frac * (high - low))
    policy = ilp.solve_monotone(problem, w_traces, a_traces)
    w, a = table_index(np.asarray(policy.w_bits)), table_index(np.asarray(policy.a_bits))
    assert ordered(w, a) and problem.fits(policy)
    np.testing.assert_allclose(problem.evaluate(policy)[0],
                               _brute(problem, monotone=ordered), rtol=1e-9)
    assert problem.evaluate(policy)[0] >= problem.evaluate(ilp.solve(problem))[0] - 1e-12


def test_greedy_fits_and_is_no_better_than_the_ilp():
  worse = 0
  for seed in range(4):
    omega, cost = _tables(10 + seed, True)
    base = Problem.create([f"l{i}" for i in range(L)], omega, cost, 1.0, w_bits=BITS,
                          a_bits=BITS)
    low, high = ilp.budget_grid(base, 2)
    for frac in (0.05, 0.2, 0.5):
      problem = base.with_limit(low + frac * (high - low))
      g = problem.evaluate(greedy.solve(problem))
      best = problem.evaluate(ilp.solve(problem))
      assert within(g[1], problem.limit)
      assert g[0] >= best[0] * (1 - 1e-12)
      worse += g[0] > best[0] * (1 + 1e-9)
  assert worse > 0  # The baseline is a baseline: the ILP beats it somewhere.


def test_greedy_on_a_hand_made_case():
  # One layer, w in {4, 8}, a fixed at 8: greedy lowers w only when over budget.
  omega = np.zeros((1, 9, 9))
  cost = np.zeros((1, 9, 9))
  omega[0, table_index(4), table_index(8)] = 1.0
  cost[0, table_index(8), table_index(8)] = 2.0
  cost[0, table_index(4), table_index(8)] = 1.0
  problem = Problem.create(["l"], omega, cost, 2.0, w_bits=(4, 8), a_bits=(8,))
  assert int(greedy.solve(problem).w_bits[0]) == 8
  assert int(greedy.solve(problem.with_limit(1.5)).w_bits[0]) == 4


def test_greedy_steps_over_bits_that_save_nothing():
  # Bit Fusion-like costs: 3, 5, 6 and 7 bits run as 4 or 8, so a one-bit
  # step down from 8 (or from 4) saves nothing; every budget down to
  # uniform W2A2's is still reached.
  bits = tuple(range(2, 9))
  runs_as = {b: min(r for r in (2, 4, 8) if r >= b) for b in bits}
  omega = np.zeros((L, 9, 9))
  cost = np.zeros((L, 9, 9))
  macs = np.arange(1.0, L + 1)
  for w, a in itertools.product(bits, bits):
    omega[:, table_index(w), table_index(a)] = macs * (4.0 ** -w + 4.0 ** -a)
    cost[:, table_index(w), table_index(a)] = macs * runs_as[w] * runs_as[a]
  base = Problem.create([f"l{i}" for i in range(L)], omega, cost, 1.0, w_bits=bits,
                        a_bits=bits)
  for w in (2, 4):
    problem = base.with_limit(float(macs.sum()) * w * w)
    policy = greedy.solve(problem)
    assert within(problem.evaluate(policy)[1], problem.limit)
  assert set(np.asarray(greedy.solve(base.with_limit(float(macs.sum()) * 4)).w_bits)) == {2}


def test_pareto_front_trades_omega_for_cost():
  omega, cost = _tables(7, True)
  base = Problem.create([f"l{i}" for i in range(L)], omega, cost, 1.0, w_bits=BITS,
                        a_bits=BITS)
  points = ilp.pareto_front(base, ilp.budget_grid(base, 8))
  assert len(points) == 8
  assert all(within(p.cost, p.limit) for p in points)
  omegas = [p.omega for p in points]
  assert all(a >= b - 1e-12 for a, b in zip(omegas, omegas[1:]))
  assert omegas[0] > omegas[-1]
  assert points[-1].omega == pytest.approx(base.omega[np.arange(L), table_index(8),
                                                      table_index(8)].sum())


def test_bad_problems_are_one_line():
  omega, cost = _tables(8, True)
  names = [f"l{i}" for i in range(L)]
  with pytest.raises(ValueError, match=r"omega has shape \(5, 9\)"):
    Problem.create(names, omega[:, :, 0], cost, 1.0, w_bits=BITS, a_bits=BITS)
  with pytest.raises(ValueError, match="ties name layer 1 twice"):
    Problem.create(names, omega, cost, 1.0, w_bits=BITS, a_bits=BITS, ties=[(1, 2), (1,)])
  bad = omega.copy()
  bad[2, table_index(4), table_index(2)] = np.inf
  with pytest.raises(ValueError, match=r"omega of layer 2 \('l2'\) at w4a2 is inf"):
    Problem.create(names, bad, cost, 1.0, w_bits=BITS, a_bits=BITS)
  with pytest.raises(ValueError, match=r"tied layers \[0, 1\] share no allowed"):
    Problem.create(names, omega, cost, 1.0, w_bits=BITS, a_bits=BITS, ties=[(0, 1)],
                   fixed_w=np.array([8, 2, -1, -1, -1]))
