"""Tests of the cycle and energy splits: compute, stall; compute, SRAM, DRAM."""

import numpy as np
import pytest

from haqjax import hardware
from haqjax.hardware import __main__ as cli

# XLA's full optimisation (tests/conftest.py): Bit Fusion's tiled loop-order search runs more than
# it compiles.
pytestmark = pytest.mark.xla_optimized

CYCLE_PARTS = ("compute_cycles", "stall_cycles")
ENERGY_PARTS = ("compute_energy_j", "sram_energy_j", "dram_energy_j")
# Presets, and memory-bound variants where stalls dominate.
TARGETS = {
    **hardware.PRESETS,
    "systolic-slow-dram": hardware.get_target("systolic", dram_bytes_per_cycle=0.5,
                                              ifmap_sram_bytes=1024,
                                              filter_sram_bytes=1024),
    "bitfusion-slow-dram": hardware.get_target("bitfusion", interface_bits=8.0),
    "bitfusion-stream": hardware.get_target("bitfusion", memory="stream"),
}


@pytest.fixture(scope="module")
def layers():
  return hardware.from_model("mobilenet_v2_small", num_classes=10, batch=2)


def _costs(target, layers, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 32], size=len(layers))
  a = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 32], size=len(layers))
  c = hardware.layer_costs(target, layers, w, a)
  return {k: np.asarray(v, np.float64) for k, v in c.items()}


@pytest.mark.parametrize("name", tuple(TARGETS))
def test_parts_sum_to_the_totals(name, layers):
  c = _costs(TARGETS[name], layers)
  assert (c["compute_cycles"] > 0).all() and (c["stall_cycles"] >= 0).all()
  np.testing.assert_allclose(c["compute_cycles"] + c["stall_cycles"], c["cycles"],
                             rtol=1e-6)
  if "energy_j" in c:
    assert all((c[k] > 0).all() for k in ENERGY_PARTS)
    np.testing.assert_allclose(sum(c[k] for k in ENERGY_PARTS), c["energy_j"],
                               rtol=1e-6)
  else:
    assert not set(ENERGY_PARTS) & set(c)


@pytest.mark.parametrize("name", ("systolic-slow-dram", "bitfusion-slow-dram",
                                  "bismo-edge", "bismo-cloud"))
def test_memory_bound_layers_stall(name, layers):
  c = _costs(TARGETS[name], layers)
  assert (c["stall_cycles"] > 0).any()


def test_systolic_stall_is_the_transfer_beyond_compute(layers):
  t = TARGETS["systolic-slow-dram"]
  c = _costs(t, layers)
  transfer = c["dram_bytes"] / t.dram_bytes_per_cycle
  np.testing.assert_allclose(c["stall_cycles"], np.maximum(transfer - c["compute_cycles"], 0),
                             rtol=1e-6, atol=1e-3 * transfer.max())
  # Compute cycles are the stall-free schedule: the same on a fast memory.
  fast = _costs(hardware.SYSTOLIC, layers)
  np.testing.assert_array_equal(c["compute_cycles"], fast["compute_cycles"])
  # The energy parts are the per-MAC, per-SRAM-byte and per-DRAM-byte energies.
  np.testing.assert_allclose(c["dram_energy_j"],
                             c["dram_bytes"] * t.energy.dram_pj_per_byte * 1e-12, rtol=1e-6)


def test_bismo_split(layers):
  t = hardware.BISMO_CLOUD
  w = np.full(len(layers), 4)
  s = {k: np.asarray(v, np.float64) for k, v in t.stages(layers, w, w).items()}
  c = {k: np.asarray(v, np.float64) for k, v in hardware.layer_costs(t, layers, w, w).items()}
  np.testing.assert_allclose(c["compute_cycles"], s["execute"] + t.overhead_cycles, rtol=1e-6)
  slowest = np.max([s["fetch_a"], s["fetch_w"], s["result"]], axis=0)
  np.testing.assert_allclose(c["stall_cycles"], np.maximum(slowest - s["execute"], 0),
                             rtol=1e-6, atol=1e-6 * slowest.max())


def test_table_target_has_no_stalls(tmp_path, layers):
  values = np.arange(len(layers) * 64, dtype=np.float64).reshape(len(layers), 8, 8) + 1
  np.save(tmp_path / "t.npy", values)
  c = _costs(hardware.get_target(f"table:{tmp_path / 't.npy'}"), layers)
  np.testing.assert_array_equal(c["compute_cycles"], c["cycles"])
  np.testing.assert_array_equal(c["stall_cycles"], 0)
  energy = hardware.TableTarget(table=values, unit="energy_j")
  c = hardware.layer_costs(energy, layers, 4.0, 4.0)
  assert "energy_j" in c and not set(ENERGY_PARTS) & set(c)


@pytest.mark.parametrize("metric", ("compute_cycles", "stall_cycles", "compute_energy",
                                    "sram_energy", "dram_energy"))
def test_parts_are_budget_metrics(metric, layers):
  t = TARGETS["systolic-slow-dram"]
  assert metric in hardware.available_metrics(t, layers)
  n = len(layers)
  budget = hardware.Budget(metric=metric, value=1.0, reference="w4a4")
  cost = budget.cost(t, layers, np.full(n, 4), np.full(n, 4))
  assert cost > 0 and budget.fits(cost, budget.resolve(t, layers))
  key = hardware.base.METRICS[metric]
  total = float(np.asarray(hardware.layer_costs(t, layers, np.full(n, 4.0),
                                                np.full(n, 4.0))[key], np.float64).sum())
  assert cost == pytest.approx(total, rel=1e-12)
  if metric.endswith("energy"):
    assert metric not in hardware.available_metrics(hardware.BISMO_EDGE, layers)


def test_cli_prints_the_parts(capsys):
  assert cli.main(["--target=bitfusion", "--model=quickstart_cnn", "--num_classes=10",
                   "--w_bits=4", "--a_bits=4", "--batch=16"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  head = out[0].split(",")
  # Bit Fusion's tiled memory model adds its per-operand DRAM traffic.
  assert head == [*cli.HEADER, "ifmap_dram_bytes", "filter_dram_bytes", "ofmap_dram_bytes"]
  assert head[2] == "cycles"
  rows = [dict(zip(head, r.split(","))) for r in out[1:]]
  assert rows[-1]["layer"] == "total"
  stalled = 0
  for r in rows:
    operands = sum(float(r[k]) for k in ("ifmap_dram_bytes", "filter_dram_bytes",
                                         "ofmap_dram_bytes"))
    assert abs(operands - float(r["dram_bytes"])) <= 2
    # Printed to whole cycles and picojoules: the parts sum to within rounding.
    assert abs(float(r["compute_cycles"]) + float(r["stall_cycles"])
               - float(r["cycles"])) <= 1
    parts = sum(float(r[k]) for k in ("compute_energy_pj", "sram_energy_pj",
                                      "dram_energy_pj"))
    assert parts == pytest.approx(float(r["energy_pj"]), rel=1e-6, abs=2)
    stalled += float(r["stall_cycles"]) > 0
  assert stalled > 0
  # A target without an energy model leaves the energy columns empty.
  assert cli.main(["--target=bismo-edge", "--model=quickstart_cnn", "--num_classes=10"]) == 0
  total = dict(zip(head, capsys.readouterr().out.strip().splitlines()[-1].split(",")))
  assert total["energy_pj"] == total["sram_energy_pj"] == "" and total["stall_cycles"] != ""
