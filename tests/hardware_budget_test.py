"""Tests of budgets: limits and costs from one float64 table, exact at 1.0x."""

import functools

import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.hardware import budget as budget_lib

# XLA's full optimisation (tests/conftest.py): Bit Fusion's tiled tables and the budget walls run
# more than they compile.
pytestmark = pytest.mark.xla_optimized

# Uniform references of the grid: every wXaX in 2..8 and floating point.
REFERENCES = tuple(f"w{b}a{b}" for b in range(2, 9)) + ("fp32",)
# Metrics of the grid (those a target models): HAQ's budgets. Every metric
# goes through the same table and sum, so the others are left out for time.
GRID_METRICS = ("latency", "energy", "size", "kmeans_size")


@functools.lru_cache(maxsize=None)
def _layers(model: str, batch: int) -> hardware.Layers:
  """The zoo model's GEMM view, at a 32x32 input where the zoo's is larger."""
  size = None if models.INPUT_SHAPES[model][0] <= 32 else 32
  return hardware.from_model(model, input_size=size, num_classes=10, batch=batch)


@pytest.mark.parametrize("model", models.MODELS)
@pytest.mark.parametrize("name", tuple(hardware.PRESETS))
def test_uniform_policy_fits_a_budget_of_itself(name, model):
  target = hardware.get_target(name)
  layers = _layers(model, target.batch)
  n = len(layers)
  available = hardware.available_metrics(target, layers)
  for metric in (m for m in GRID_METRICS if m in available):
    table = hardware.Budget(metric=metric).table(target, layers)
    for ref in REFERENCES:
      w, a = budget_lib.reference_bits(ref)
      cost = budget_lib.table_cost(table, np.full(n, w), np.full(n, a))
      exact = hardware.Budget(metric=metric, value=1.0, reference=ref)
      assert cost == exact.reference_in(table) > 0, (metric, ref)
      assert exact.fits(cost, exact.limit_from(exact.reference_in(table))), (metric, ref)
      tighter = hardware.Budget(metric=metric, value=0.999, reference=ref)
      assert not tighter.fits(cost, tighter.limit_from(tighter.reference_in(table))), (
          metric, ref)
    # The public entry points compute the same numbers.
    w4a4 = hardware.Budget(metric=metric, value=1.0, reference="w4a4")
    cost = w4a4.cost(target, layers, np.full(n, 4), np.full(n, 4))
    assert cost == w4a4.resolve(target, layers) == w4a4.reference_in(table), metric
    assert w4a4.fits(cost, w4a4.resolve(target, layers)), metric


def test_float32_sums_differ_from_the_limit(target=hardware.BISMO_EDGE):
  # The case that motivated one float64 table: uniform W4A4 on quickstart_cnn
  # summed in float32 on device is not the float64 sum of its layers.
  layers = _layers("quickstart_cnn", 1)
  n = len(layers)
  b = hardware.Budget(metric="latency", value=1.0, reference="w4a4")
  f32 = float(hardware.policy_cost(target, layers, np.full(n, 4), np.full(n, 4)))
  f64 = float(np.asarray(hardware.layer_costs(target, layers, np.full(n, 4.0),
                                              np.full(n, 4.0))["latency_s"],
                         np.float64).sum())
  assert b.resolve(target, layers) == pytest.approx(f64, rel=1e-12)
  assert abs(f32 - f64) / f64 > budget_lib.RTOL


def test_table_cost_indexes_bits_and_refuses_others():
  table = np.arange(2 * 9 * 9, dtype=np.float64).reshape(2, 9, 9)
  np.testing.assert_array_equal(
      budget_lib.table_cost(table, [[1, 32], [8, 2]], [[32, 1], [8, 8]]),
      [table[0, 0, 8] + table[1, 8, 0], table[0, 7, 7] + table[1, 1, 7]])
  with pytest.raises(ValueError, match="bits 9 have no cost table entry"):
    budget_lib.table_cost(table, [9, 1], [1, 1])


def test_within_is_relative():
  assert budget_lib.within(1e6 * (1 + 0.5 * budget_lib.RTOL), 1e6)
  assert not budget_lib.within(1e6 * (1 + 2 * budget_lib.RTOL), 1e6)
  assert budget_lib.within(1e-6 * (1 + 0.5 * budget_lib.RTOL), 1e-6)
  assert not budget_lib.within(1e-6 * (1 + 2 * budget_lib.RTOL), 1e-6)


def test_ratio_of_a_free_reference_is_refused():
  b = hardware.Budget(metric="latency", value=0.5)
  with pytest.raises(ValueError, match="a reference that costs 0 s"):
    b.limit_from(0.0)
  assert hardware.Budget(metric="latency", value=0.5, kind="absolute").limit_from(0.0) == 0.5


def test_cost_table_is_kept_per_target_metric_and_layers():
  layers = _layers("quickstart_cnn", 1)
  target = hardware.BISMO_EDGE
  first = budget_lib.cost_table(target, layers, "latency")
  first[:] = -1.0  # The caller's copy: the kept table is untouched.
  again = budget_lib.cost_table(target, layers, "latency")
  assert (again > 0).all()
  fresh = np.asarray(hardware.cost_tensor(target, layers, np.asarray(
      budget_lib.TABLE_BITS, np.float32), "latency"), np.float64)
  np.testing.assert_array_equal(again, fresh)
  # Other layers' values (a batch of 2) or another metric: another table.
  double = hardware.from_model("quickstart_cnn", num_classes=10, batch=2)
  assert not np.array_equal(budget_lib.cost_table(target, double, "latency"), again)
  assert not np.array_equal(budget_lib.cost_table(target, layers, "size"), again)
