"""Tests of the search environment: observations, actions to bits, the budget wall."""

import functools

import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.nn import layer_table
from haqjax.search import env

# XLA's full optimisation (tests/conftest.py): Bit Fusion's budget walls run more than they compile.
pytestmark = pytest.mark.xla_optimized


@pytest.fixture(scope="module")
def table():
  return layer_table(models.create("quickstart_cnn", num_classes=10), (1, 28, 28, 1))


@pytest.fixture(scope="module")
def layers(table):
  return hardware.from_layer_table(table)


def test_action_to_bits_splits_the_interval_evenly():
  a = np.linspace(0, 1, 7001)
  bits = env.action_to_bits(a, 2, 8)
  assert bits.min() == 2 and bits.max() == 8
  counts = np.bincount(bits)[2:]
  assert counts.max() - counts.min() <= 2  # 7 equal parts of [0, 1].
  np.testing.assert_array_equal(env.action_to_bits([0.0, 0.5, 1.0], 2, 8), [2, 5, 8])
  np.testing.assert_array_equal(env.action_to_bits([0.0, 1.0], 4, 4), [4, 4])


@pytest.mark.parametrize("lo, hi, msg", [(5, 3, "min_bits=5 is larger than max_bits=3"),
                                         (0, 8, "min_bits=0"), (2, 9, "max_bits=9")])
def test_bad_bit_range(lo, hi, msg):
  with pytest.raises(ValueError, match=msg):
    env.check_bit_range(lo, hi)


def test_observations(table):
  obs = env.observations(table, "linear")
  assert obs.shape == (2 * len(table), len(env.COLUMNS))
  assert obs.min() >= 0.0 and obs.max() <= 1.0
  col = env.COLUMNS.index
  # Weight step then activation step for each layer; the flag matches the role.
  np.testing.assert_array_equal(obs[0::2, col("is_weight")], 1.0)
  np.testing.assert_array_equal(obs[1::2, col("is_weight")], 0.0)
  np.testing.assert_array_equal(obs[:, col("prev_action")], 0.0)
  np.testing.assert_allclose(obs[0::2, col("layer")], np.linspace(0, 1, len(table)))
  big = int(np.argmax(table.params))
  assert obs[2 * big, col("params")] == 1.0
  km = env.observations(table, "kmeans")
  assert km.shape == (len(table), len(env.COLUMNS))
  with pytest.raises(ValueError, match="quantization='int'"):
    env.observations(table, "int")


def test_actions_to_policy(table):
  n = len(table)
  actions = np.linspace(0, 1, 2 * n)
  w, a = env.actions_to_policy(actions, table.names, mode="linear", min_bits=2, max_bits=8)
  np.testing.assert_array_equal(w, env.action_to_bits(actions[0::2], 2, 8))
  np.testing.assert_array_equal(a, env.action_to_bits(actions[1::2], 2, 8))
  w, a = env.actions_to_policy(actions[:n], table.names, mode="kmeans", min_bits=2,
                               max_bits=8)
  np.testing.assert_array_equal(a, 32)


def _reference_enforce(target, layers, limit, w, a, min_bits, fixed_w, fixed_a):
  """HAQ's wall, written directly on the hardware model's policy cost."""
  w, a = np.array(w), np.array(a)
  cost = lambda: float(hardware.policy_cost(target, layers, w, a, "latency"))
  while cost() > limit * (1 + 1e-9):
    for i in reversed(range(len(w))):
      if not fixed_a[i] and a[i] > min_bits:
        a[i] -= 1
        if cost() <= limit * (1 + 1e-9):
          return w, a
      if not fixed_w[i] and w[i] > min_bits:
        w[i] -= 1
        if cost() <= limit * (1 + 1e-9):
          return w, a
  return w, a


@pytest.mark.parametrize("first, last", [(False, False), (True, True)])
def test_enforce_matches_haq_wall(table, layers, first, last):
  target = hardware.get_target("bismo-edge")
  fixed = env.Fixed.create(len(table), mode="linear", first_layer_w8=first,
                           last_layer_w8a8=last)
  wall = env.BudgetWall(target, layers, hardware.Budget(metric="latency", value=0.6),
                        min_bits=2, max_bits=8, fixed=fixed)
  rng = np.random.RandomState(0)
  for _ in range(10):
    w, a = rng.randint(2, 9, len(table)), rng.randint(2, 9, len(table))
    got_w, got_a = wall.enforce(w, a)
    fw, fa = fixed.apply(w, a)
    want_w, want_a = _reference_enforce(target, layers, wall.limit, fw, fa, 2,
                                        fixed.w >= 0, fixed.a >= 0)
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_a, want_a)
    assert wall.fits(got_w, got_a)
    np.testing.assert_allclose(
        wall.cost(got_w, got_a),
        float(hardware.policy_cost(target, layers, got_w, got_a, "latency")), rtol=1e-5)
    if first:
      assert got_w[0] == 8 and got_a[0] == 32
    if last:
      assert got_w[-1] == 8 and got_a[-1] == 8
  # A policy within the budget is left alone.
  w = np.full(len(table), 2)
  np.testing.assert_array_equal(wall.enforce(w, w)[0], fixed.apply(w, w)[0])


def _layers(n):
  """`n` dense layers (a table target reads only their count)."""
  one = [1] * n
  return hardware.make_layers(names=[f"l{i}" for i in range(n)], in_channels=[4] * n,
                              out_channels=[4] * n, kernel_h=one, kernel_w=one, groups=one,
                              in_h=one, in_w=one, out_h=one, out_w=one, batch=1)


def _table_wall(layers, w_cost, a_cost, limit, order, fixed=None):
  """A wall over a table target whose entry `[l, w-1, a-1]` is
  `w_cost[l, w-1] + a_cost[l, a-1]`, with an absolute cycle limit."""
  target = hardware.TableTarget(table=w_cost[:, :, None] + a_cost[:, None, :])
  fixed = fixed or env.Fixed.create(len(layers), mode="linear")
  return env.BudgetWall(target, layers, hardware.Budget(metric="cycles", value=limit,
                                                        kind="absolute"),
                        min_bits=2, max_bits=8, fixed=fixed, order=order)


def test_saving_order_lowers_the_layer_that_costs():
  # Layer 0 costs 100 a bit, every other layer 1; all at 5 bits, the limit is
  # uniform 4 bits' cost. Three drops of layer 0 (activations first, then the
  # role with more bits) save more than the 2 x (100 + L - 1) needed.
  n = 9
  bits = np.arange(1, 9, dtype=np.float64)
  c = np.array([100.0] + [1.0] * (n - 1))
  per_bit = c[:, None] * bits[None, :]
  walls = {o: _table_wall(_layers(n), per_bit, per_bit, float(2 * c.sum() * 4), o)
           for o in env.WALL_ORDERS}
  five = np.full(n, 5)
  w, a = walls["saving"].enforce(five, five)
  np.testing.assert_array_equal(w, [4] + [5] * (n - 1))
  np.testing.assert_array_equal(a, [3] + [5] * (n - 1))
  # HAQ's sweep lowers every layer (18 bits where 3 do).
  np.testing.assert_array_equal(walls["haq"].enforce(five, five), np.full((2, n), 4))


def test_saving_order_skips_plateaus_and_gives_bits_back():
  # Only layer 0's weights change the cost, with Bit Fusion-like steps. The
  # best saving per bit is 8 -> 3 (90 over 5 bits); once within the limit
  # (8 below the start), bits come back while it fits: 3 -> 4 -> 5.
  n = 6
  w_cost = np.zeros((n, 8))
  w_cost[0] = [0, 0, 10, 40, 90, 95, 98, 100]
  a_cost = np.zeros((n, 8))
  w_cost[1:] = 1.0  # Flat: lowering these saves nothing.
  total = 100.0 + (n - 1)
  wall = _table_wall(_layers(n), w_cost, a_cost, total - 8, "saving")
  eight = np.full(n, 8)
  w, a = wall.enforce(eight, eight)
  np.testing.assert_array_equal(w, [5] + [8] * (n - 1))
  np.testing.assert_array_equal(a, eight)


@pytest.mark.parametrize("first, last", [(False, False), (True, True)])
def test_saving_order_fits_and_only_lowers(table, layers, first, last):
  target = hardware.get_target("bitfusion")
  fixed = env.Fixed.create(len(table), mode="linear", first_layer_w8=first,
                           last_layer_w8a8=last)
  walls = {o: env.BudgetWall(target, layers, hardware.Budget(metric="latency", value=1.0,
                                                             reference="w4a4"),
                             min_bits=2, max_bits=8, fixed=fixed, order=o)
           for o in env.WALL_ORDERS}
  rng = np.random.RandomState(1)
  removed = {o: 0 for o in walls}
  for _ in range(20):
    w0, a0 = fixed.apply(rng.randint(2, 9, len(table)), rng.randint(2, 9, len(table)))
    for order, wall in walls.items():
      w, a = wall.enforce(w0, a0)
      assert wall.fits(w, a)
      assert (w <= w0).all() and (a <= a0).all() and min(w.min(), a.min()) >= 2
      np.testing.assert_array_equal(fixed.apply(w, a)[0], w)
      np.testing.assert_array_equal(fixed.apply(w, a)[1], a)
      removed[order] += int((w0 - w).sum() + (a0 - a).sum())
      if order == "saving":  # No lowered bit could come back.
        for bits, start in ((w, w0), (a, a0)):
          for i in np.flatnonzero(bits < start):
            bits[i] += 1
            assert not wall.fits(w, a)
            bits[i] -= 1
  assert removed["saving"] < removed["haq"]
  # A policy within the budget is left alone.
  np.testing.assert_array_equal(walls["saving"].enforce(w, a), (w, a))


def test_unknown_wall_order(table, layers):
  with pytest.raises(ValueError, match=r"^wall_order='cost' is not allowed; allowed: haq, saving$"):
    env.BudgetWall(hardware.get_target("bismo-edge"), layers,
                   hardware.Budget(metric="latency", value=0.6), min_bits=2, max_bits=8,
                   fixed=env.Fixed.create(len(table), mode="linear"), order="cost")


def test_infeasible_budget_names_the_minimum(table, layers):
  target = hardware.get_target("bismo-edge")
  fixed = env.Fixed.create(len(table), mode="linear")
  low = hardware.uniform_cost(target, layers, 2, 2, "latency")
  w8a8 = hardware.uniform_cost(target, layers, 8, 8, "latency")
  with pytest.raises(ValueError, match=r"below the lowest cost reachable with bits >= 2"
                     ) as e:
    env.BudgetWall(target, layers, hardware.Budget(metric="latency", value=0.01),
                   min_bits=2, max_bits=8, fixed=fixed)
  assert f"{low / w8a8:.4g} x w8a8" in str(e.value)
  assert "\n" not in str(e.value)


def test_size_budget_in_kmeans_mode(table, layers):
  target = hardware.get_target("bismo-edge")
  fixed = env.Fixed.create(len(table), mode="kmeans")
  wall = env.BudgetWall(target, layers,
                        hardware.Budget(metric="size", value=0.1, reference="fp32"),
                        min_bits=2, max_bits=8, fixed=fixed)
  w, a = wall.enforce(np.full(len(table), 8), np.full(len(table), 8))
  np.testing.assert_array_equal(a, 32)
  assert wall.fits(w, a) and w.min() >= 2


def test_kmeans_size_budget_counts_the_codebooks(table, layers):
  # At 0.2x the FP32 size, the policy the plain size budget keeps (7-bit
  # labels from the first layers on) is over once its 2**w centroids count.
  target = hardware.get_target("bismo-edge")
  fixed = env.Fixed.create(len(table), mode="kmeans")
  walls = {m: env.BudgetWall(target, layers,
                             hardware.Budget(metric=m, value=0.2, reference="fp32"),
                             min_bits=2, max_bits=8, fixed=fixed)
           for m in ("size", "kmeans_size")}
  assert walls["size"].limit == walls["kmeans_size"].limit  # FP32: no codebooks.
  eight = np.full(len(table), 8)
  w, a = walls["size"].enforce(eight, eight)
  codebooks = sum(2.0 ** b * 32 / 8 for b in w)
  assert walls["kmeans_size"].cost(w, a) == walls["size"].cost(w, a) + codebooks
  assert not walls["kmeans_size"].fits(w, a)
  km_w, km_a = walls["kmeans_size"].enforce(eight, eight)
  assert walls["kmeans_size"].fits(km_w, km_a) and km_w.sum() < w.sum()


@functools.lru_cache(maxsize=None)
def _zoo_layers(model: str, batch: int) -> hardware.Layers:
  size = None if models.INPUT_SHAPES[model][0] <= 32 else 32
  return hardware.from_model(model, input_size=size, num_classes=10, batch=batch)


@pytest.mark.parametrize("model", models.MODELS)
@pytest.mark.parametrize("name", tuple(hardware.PRESETS))
def test_uniform_policy_meets_a_wall_of_itself(name, model):
  # Uniform wXaX fits a 1.0 x wXaX wall and is left alone; at 0.999x the wall
  # either refuses the budget (nothing cheaper is reachable) or lowers bits.
  target = hardware.get_target(name)
  layers = _zoo_layers(model, target.batch)
  n = len(layers)
  fixed = env.Fixed.create(n, mode="linear")
  for metric in ("latency", "energy", "size"):
    if metric not in hardware.available_metrics(target, layers):
      continue
    for bits in (2, 4, 8):
      w = a = np.full(n, bits)
      ref = f"w{bits}a{bits}"
      wall = env.BudgetWall(target, layers,
                            hardware.Budget(metric=metric, value=1.0, reference=ref),
                            min_bits=1, max_bits=8, fixed=fixed)
      assert wall.fits(w, a) and wall.cost(w, a) == wall.limit, (metric, ref)
      np.testing.assert_array_equal(np.stack(wall.enforce(w, a)), np.stack([w, a]))
      try:
        tight = env.BudgetWall(target, layers,
                               hardware.Budget(metric=metric, value=0.999, reference=ref),
                               min_bits=1, max_bits=8, fixed=fixed)
      except ValueError as e:
        assert "below the lowest cost reachable" in str(e), (metric, ref)
        continue
      assert not tight.fits(w, a), (metric, ref)
      low_w, low_a = tight.enforce(w, a)
      assert tight.fits(low_w, low_a) and (low_w + low_a).sum() < 2 * bits * n


@pytest.mark.parametrize("lo, hi", [(2, 8), (1, 8), (4, 4)])
def test_bits_to_action_is_the_centre_of_the_bits_interval(lo, hi):
  bits = np.arange(lo, hi + 1)
  actions = env.bits_to_action(bits, lo, hi)
  assert actions.min() > 0 and actions.max() < 1
  np.testing.assert_array_equal(env.action_to_bits(actions, lo, hi), bits)
  # Half an interval away on either side is still the same bits (the centre).
  half = 0.5 / (hi - lo + 1)
  np.testing.assert_array_equal(env.action_to_bits(actions - 0.99 * half, lo, hi), bits)
  np.testing.assert_array_equal(env.action_to_bits(actions + 0.99 * half, lo, hi), bits)
  # Fixed bits outside the range go to the nearest end.
  np.testing.assert_array_equal(env.bits_to_action([32, 0], lo, hi), [1.0, 0.0])


def test_policy_to_actions_inverts_actions_to_policy(table):
  rng = np.random.RandomState(1)
  n = len(table)
  w, a = rng.randint(2, 9, n), rng.randint(2, 9, n)
  actions = env.policy_to_actions(w, a, mode="linear", min_bits=2, max_bits=8)
  assert actions.shape == (2 * n,)
  got_w, got_a = env.actions_to_policy(actions, table.names, mode="linear",
                                       min_bits=2, max_bits=8)
  np.testing.assert_array_equal(got_w, w)
  np.testing.assert_array_equal(got_a, a)
  km = env.policy_to_actions(w, np.full(n, 32), mode="kmeans", min_bits=2, max_bits=8)
  got_w, _ = env.actions_to_policy(km, table.names, mode="kmeans", min_bits=2, max_bits=8)
  np.testing.assert_array_equal(got_w, w)
