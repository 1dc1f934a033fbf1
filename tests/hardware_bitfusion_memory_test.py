"""The tiled Bit Fusion model against the Bit Fusion simulator's own runs.

`data/bitfusion_reference.json` holds runs of the simulator
(github.com/hsharma35/bitfusion; its commit, config and command are in the
file) on the conv and FC layers of ResNet-18, ResNet-20 and MobileNetV2 at
`(w, a)` in {2, 4, 8}^2 and batch 1 and 16, and on one group of each
depthwise layer. The figures of the benchmark are `agreement()`:

  python tests/hardware_bitfusion_memory_test.py

prints the mean and max relative error of total cycles and energy, by layer
kind, bits and batch.
"""

import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import hardware
from haqjax.hardware import bitfusion_memory
from haqjax.hardware import bitfusion_reference

# XLA's full optimisation (tests/conftest.py): Bit Fusion's tiled loop-order search runs more than
# it compiles.
pytestmark = pytest.mark.xla_optimized

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                         "bitfusion_reference.json")
TILED = hardware.BitFusion(memory="tiled")


def agreement():
  """The model's agreement with the reference (`bitfusion_reference.agreement`)."""
  return bitfusion_reference.agreement(REFERENCE, TILED)


@pytest.fixture(scope="module")
def result():
  return agreement()


@pytest.fixture(scope="module")
def small():
  """A first layer (im2col), a strided 3x3 conv, a depthwise conv and an FC."""
  return hardware.make_layers(
      names=["stem", "conv", "dw", "fc"], in_channels=[3, 32, 64, 256],
      out_channels=[32, 64, 64, 10], kernel_h=[3, 3, 3, 1], kernel_w=[3, 3, 3, 1],
      groups=[1, 1, 64, 1], in_h=[32, 16, 8, 1], in_w=[32, 16, 8, 1],
      out_h=[16, 8, 8, 1], out_w=[16, 8, 8, 1], batch=4)


@pytest.fixture(scope="module")
def small_table(small):
  t = jax.jit(bitfusion_memory.table, static_argnums=0)(TILED, small)
  return {k: np.asarray(v, np.float64) for k, v in t.items()}     # [L, 8, 8]


def test_reference_is_the_simulator_at_our_defaults():
  ref = bitfusion_reference.load(REFERENCE)
  sim = ref["simulator"]
  assert re.fullmatch(r"[0-9a-f]{40}", sim["commit"])
  config = dict(re.findall(r"(\w+) = (\d+)", sim["config"]))
  t = TILED
  assert (int(config["a"]), int(config["c"])) == (t.rows, t.cols)
  assert int(config["if_width"]) == t.interface_bits
  assert int(config["frequency"]) == t.clock_hz
  assert (int(config["Wgt_SRAM"]), int(config["Act_SRAM"]), int(config["Out_SRAM"])) == (
      t.wbuf_bytes, t.ibuf_bytes, t.obuf_bytes)
  e, mine = sim["energy_pj"], t.buffer_energy
  assert mine.array_pj_per_cycle == pytest.approx(e["core_per_cycle"], rel=1e-6)
  for buf in ("wbuf", "ibuf", "obuf"):
    for op in ("read", "write"):
      assert getattr(mine, f"{buf}_{op}_pj_per_bit") == pytest.approx(
          e[f"{buf}_{op}_per_bit"], rel=1e-6)
  assert t.dram_pj_per_bit == e["dram_per_bit"]


# (batch, bit pairs) every layer of the three networks has a run for.
COVERED = tuple((batch, tuple((w, a) for w in (2, 4, 8) for a in (2, 4, 8)))
                for batch in (1, 16))


def test_reference_covers_the_layer_set():
  ref = bitfusion_reference.load(REFERENCE)
  have = {(r[0], r[1], r[2], r[3]) for r in ref["runs"]}
  for batch, pairs in COVERED:
    _, info = bitfusion_reference.network_layers(ref, batch)
    assert len(info) == 21 + 22 + 53
    for _, key, _ in info:
      for w, a in pairs:
        assert (key, batch, w, a) in have, (key, batch, w, a)


def test_agreement_meets_the_targets(result):
  # The targets of the requirement: total cycles within 15% and energy within
  # 25%, mean over the conv and FC layers.
  s = result["summary"]
  assert s["conv_fc"]["runs"] >= sum(len(p) for _, p in COVERED) * (21 + 22 + 36)
  assert s["conv_fc"]["cycles_mean_err"] <= 0.15
  assert s["conv_fc"]["energy_mean_err"] <= 0.25
  assert s["depthwise"]["cycles_mean_err"] <= 0.15
  assert s["depthwise"]["energy_mean_err"] <= 0.25


@pytest.mark.parametrize("quantity", tuple(bitfusion_reference.COMPARED))
def test_every_run_is_the_simulators_optimum(result, quantity):
  # The search finds the simulator's schedule on these layers (module
  # docstring), so each run agrees up to float32 sums: cycles and energy
  # within 1e-5; the parts of the energy within 1e-5 of the total.
  worst = max(result["runs"], key=lambda r: r[quantity][2])
  if quantity in ("cycles", "energy"):
    assert worst[quantity][2] <= 1e-5, worst
  else:
    total = "cycles" if quantity == "stall_cycles" else "energy"
    for r in result["runs"]:
      pred, want, _ = r[quantity]
      assert abs(pred - want) <= 1e-5 * r[total][1], r


def test_schedule_structure(small, small_table):
  t = small_table
  bits = np.arange(1.0, 9.0)
  w, a = bits[None, :, None], bits[None, None, :]
  pf = np.floor(8 / np.maximum(a, 2)) * np.floor(8 / np.maximum(w, 2))
  lanes = TILED.rows * pf
  kk = np.asarray(small.kernel_size)[:, None, None]
  ic = t["ic"]
  wgt = np.ceil(kk * ic / lanes) * lanes * t["oc"] * w
  out = t["o"] ** 2 * np.ceil(t["oc"] / TILED.cols) * TILED.cols * t["b"] * 32
  # Each operand's tile fits half its buffer (double buffering).
  assert (wgt <= TILED.wbuf_bytes * 4).all()
  assert (out <= TILED.obuf_bytes * 4).all()
  assert (t["order"] >= 0).all() and (t["order"] < len(bitfusion_memory.ORDERS)).all()
  # Cycles are compute plus stalls; the first fill never overlaps compute.
  np.testing.assert_allclose(t["compute"] + t["stall"], t["cycles"], rtol=1e-6)
  assert (t["stall"] >= 1).all()
  # Tiles only add padding to the stall-free compute of the array.
  formula = np.asarray(TILED.compute_cycles(small, w[..., None], a[..., None]))
  formula = np.moveaxis(formula[0], -1, 0)                        # [L, 8, 8]
  groups = np.asarray(small.groups)[:, None, None]
  assert (t["compute"] * groups >= formula - 1e-3).all()
  # Every weight and input is fetched at least once, outputs read and written.
  weights = np.asarray(small.weights / small.groups)[:, None, None]
  assert (t["wgt_bits"] >= weights * w - 1e-3).all()
  outs = np.asarray(small.out_elems / small.groups)[:, None, None]
  assert (t["out_bits"] >= 2 * 32 * outs - 1e-3).all()


def test_costs_split_and_select_by_bits(small, small_table):
  c = hardware.layer_costs(TILED, small, jnp.asarray([2.0, 4.0, 8.0, 32.0]),
                           jnp.asarray([3.0, 8.0, 2.6, 1.0]))
  c = {k: np.asarray(v, np.float64) for k, v in c.items()}
  np.testing.assert_allclose(c["compute_cycles"] + c["stall_cycles"], c["cycles"],
                             rtol=1e-6)
  np.testing.assert_allclose(c["compute_energy_j"] + c["sram_energy_j"]
                             + c["dram_energy_j"], c["energy_j"], rtol=1e-6)
  np.testing.assert_allclose(c["filter_dram_bytes"] + c["ifmap_dram_bytes"]
                             + c["ofmap_dram_bytes"], c["dram_bytes"], rtol=1e-6)
  # Layer l's cost is the table entry at its own bits (32 runs as 8, 2.6 as 3).
  for l, (w, a) in enumerate(((2, 3), (4, 8), (8, 3), (8, 1))):
    want = small_table["cycles"][l, w - 1, a - 1] * float(small.groups[l])
    assert c["cycles"][l] == pytest.approx(want, rel=1e-6)


def test_depthwise_is_its_groups_run_one_after_the_other(small):
  one = hardware.make_layers(names=["pad", "dw1"], in_channels=[3, 1],
                             out_channels=[8, 1], kernel_h=[3, 3], kernel_w=[3, 3],
                             groups=[1, 1], in_h=[8, 8], in_w=[8, 8], out_h=[8, 8],
                             out_w=[8, 8], batch=4)
  dw = hardware.layer_costs(TILED, small, 4.0, 4.0)
  single = hardware.layer_costs(TILED, one, 4.0, 4.0)
  for k in ("cycles", "stall_cycles", "energy_j", "dram_bytes"):
    assert float(dw[k][2]) == pytest.approx(64 * float(single[k][1]), rel=1e-6), k


def test_one_trace_serves_every_policy(small):

  @jax.jit
  @chex.assert_max_traces(n=1)
  def cycles(w, a):
    return bitfusion_memory.tiled_cost(TILED, small, w, a)["cycles"].sum()

  rng = np.random.default_rng(0)
  totals = {float(cycles(*rng.integers(1, 9, size=(2, 4)).astype(np.float32)))
            for _ in range(3)}
  assert len(totals) > 1


def test_memory_model_is_checked():
  with pytest.raises(ValueError, match="memory.*'stream', 'tiled'"):
    hardware.BitFusion(memory="dram")
  with pytest.raises(ValueError, match="array_pj_per_cycle"):
    bitfusion_memory.BufferEnergy(array_pj_per_cycle=0.0)


if __name__ == "__main__":
  s = agreement()["summary"]
  print(f"{'layers':<16} {'runs':>5} {'cycles mean':>12} {'max':>9} "
        f"{'energy mean':>12} {'max':>9}")
  for name, v in sorted(s.items()):
    print(f"{name:<16} {v['runs']:>5} {v['cycles_mean_err']:>12.2e} "
          f"{v['cycles_max_err']:>9.2e} {v['energy_mean_err']:>12.2e} "
          f"{v['energy_max_err']:>9.2e}")
