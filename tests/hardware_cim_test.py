"""Tests of the compute-in-memory (NeuroSim-like crossbar) target."""

import jax
import numpy as np
import pytest

from haqjax import hardware
from haqjax.hardware import __main__ as cli
from haqjax.hardware import cim

# Energies chosen so that each count reads off the energy in picojoules.
UNIT = dict(cell_read_fj=1000.0, dac_fj_per_level=10_000.0, adc_fj_per_level=1.0,
            shift_add_pj=1.0, sram_pj_per_byte=8.0, dram_pj_per_byte=8.0)


def _layers(batch=2):
  """A 1x1 conv (K=300, N=40), a 3x3 depthwise conv (32 channels), a dense."""
  return hardware.make_layers(
      names=["pw", "dw", "fc"], in_channels=[300, 32, 64],
      out_channels=[40, 32, 10], kernel_h=[1, 3, 1], kernel_w=[1, 3, 1],
      groups=[1, 32, 1], in_h=[5, 6, 1], in_w=[5, 6, 1], out_h=[5, 4, 1],
      out_w=[5, 4, 1], batch=batch)


def _np(costs):
  return {k: np.asarray(v, np.float64) for k, v in costs.items()}


def test_pointwise_counts_by_hand():
  t = cim.Cim(**UNIT)
  c = _np(t.layer_cost(_layers(), 8.0, 5.0))
  # 1x1 conv, batch 2: M = 2*25 = 50, K = 300, N = 40. w=8 on 2-bit cells: 4
  # columns per weight, 160 columns: ceil(300/128) = 3 row tiles x
  # ceil(160/128) = 2 column tiles = 6 crossbars. a=5 on a 1-bit DAC: 5 input
  # cycles, each reading the 8 columns of an ADC's mux one at a time.
  assert c["crossbars"][0] == 6
  assert c["compute_cycles"][0] == 50 * 5 * 8
  cell_reads = 50 * 40 * 300 * 4 * 5          # MACs * slices * input cycles
  row_drives = 50 * 5 * 300 * 2               # pixels * cycles * rows * col tiles
  conversions = 50 * 5 * 3 * 40 * 4           # pixels * cycles * row tiles * cols
  adc_pj = 31 * 1e-3                          # 5 bits: 31 levels at 1 fJ
  want = cell_reads * 1.0 + row_drives * 10.0 + conversions * (adc_pj + 1.0)
  assert c["compute_energy_j"][0] * 1e12 == pytest.approx(want, rel=1e-6)
  # Buffer: the im2col inputs at 5 bits per pixel, the outputs at 8 bits.
  sram_bytes = (50 * 300 * 5 + 50 * 40 * 8) / 8
  assert c["sram_energy_j"][0] * 1e12 == pytest.approx(sram_bytes * 8.0, rel=1e-6)
  # DRAM: the input feature map at 5 bits, the outputs at 8 bits.
  dram_bytes = (50 * 300 * 5 + 50 * 40 * 8) / 8
  assert c["dram_bytes"][0] == pytest.approx(dram_bytes, rel=1e-6)
  assert c["utilization"][0] == pytest.approx(300 * 40 * 4 / (6 * 128 * 128), rel=1e-6)


def test_depthwise_maps_one_column_group_per_channel():
  c = _np(cim.CIM.layer_cost(_layers(batch=1), 8.0, 8.0))
  # 32 channels of 9 weights, 4 columns each: min(floor(128/9), floor(128/4))
  # = 14 channels share a crossbar's diagonal: ceil(32/14) = 3 crossbars.
  assert c["crossbars"][1] == 3
  assert c["utilization"][1] == pytest.approx(32 * 9 * 4 / (3 * 128 * 128), rel=1e-6)
  # 16 output pixels, 8 input cycles, 14*4 = 56 columns in use: 8 mux cycles.
  assert c["compute_cycles"][1] == 16 * 8 * 8
  # On 16x16 crossbars one channel fills a crossbar's rows: 32 crossbars, and
  # with 1-bit weights on 2-bit cells it uses one column: one mux cycle.
  small = cim.Cim(rows=16, cols=16, cols_per_adc=4)
  c = _np(small.layer_cost(_layers(batch=1), 2.0, 8.0))
  assert c["crossbars"][1] == 32
  assert c["compute_cycles"][1] == 16 * 8 * 1
  c = _np(small.layer_cost(_layers(batch=1), 8.0, 8.0))
  assert c["compute_cycles"][1] == 16 * 8 * 4      # 4 columns used: all 4 mux positions


def test_converters_and_area():
  # The docstring's figures: 1.7 fJ per level, 52.7 fJ per 5-bit conversion;
  # a 1-bit row drive 24 fJ.
  assert cim.CIM.adc_pj == pytest.approx(0.0527)
  assert cim.CIM.dac_pj == pytest.approx(0.024)
  # A d-bit ADC's energy grows with its 2**d - 1 levels; a 2-bit DAC's too.
  assert cim.Cim(adc_bits=6).adc_pj / cim.CIM.adc_pj == pytest.approx(63 / 31)
  assert cim.Cim(dac_bits=2).dac_pj / cim.CIM.dac_pj == pytest.approx(3.0)
  # One crossbar: 128*128 cells of 0.0768 um^2 and 16 ADCs of 31 levels at
  # 4.7 um^2 each.
  one = (128 * 128 * 0.0768 + 16 * 31 * 4.7) * 1e-6
  assert float(cim.CIM.area_mm2(1.0)) == pytest.approx(one, rel=1e-6)
  c = _np(cim.CIM.layer_cost(_layers(), 8.0, 8.0))
  np.testing.assert_allclose(c["area_mm2"], c["crossbars"] * one, rtol=1e-6)


def test_input_cycles_follow_the_dac():
  layers = _layers()
  one = _np(cim.CIM.layer_cost(layers, 8.0, 7.0))["compute_cycles"]
  two = _np(cim.Cim(dac_bits=2).layer_cost(layers, 8.0, 7.0))["compute_cycles"]
  np.testing.assert_array_equal(one / 7, two / 4)      # ceil(7/1) vs ceil(7/2)


@pytest.mark.parametrize("overrides", [{}, {"cell_bits": 1}, {"dac_bits": 2},
                                       {"rows": 64, "cols": 32, "cols_per_adc": 16}])
def test_monotone_in_bits(overrides):
  target = hardware.get_target("cim", **overrides)
  layers = hardware.from_model("mobilenet_v2_small", num_classes=10, batch=2)
  for metric in ("cycles", "energy", "compute_energy", "sram_energy", "dram_energy",
                 "dram"):
    t = np.asarray(hardware.cost_tensor(target, layers, metric=metric))
    assert (np.diff(t, axis=1) >= 0).all(), metric
    assert (np.diff(t, axis=2) >= 0).all(), metric
  bits = np.arange(1.0, 9.0)
  area = np.asarray(hardware.layer_costs(target, layers, bits[:, None], 8.0)["area_mm2"])
  # Layers smaller than a crossbar take one whatever their bits; the network grows.
  assert (np.diff(area, axis=0) >= 0).all() and area[-1].sum() > area[0].sum()
  # Fewer weight bits save energy on every layer (fewer slices to read and
  # convert); fewer activation bits save cycles on every layer.
  e = np.asarray(hardware.cost_tensor(target, layers, metric="compute_energy"))
  assert (e[:, 1, 7] < e[:, 7, 7]).all()
  cyc = np.asarray(hardware.cost_tensor(target, layers, metric="compute_cycles"))
  assert (cyc[:, 7, 1] < cyc[:, 7, 7]).all()


def test_traced_bits_one_trace_for_many_policies():
  layers = hardware.from_model("quickstart_cnn", num_classes=10, batch=1)
  n = len(layers)
  traces = []

  def energy(w, a):
    traces.append(None)
    return cim.CIM.layer_cost(layers, w, a)["energy_j"].sum()

  f = jax.jit(jax.vmap(energy))
  rng = np.random.default_rng(0)
  policies = []
  for _ in range(3):
    w = rng.integers(1, 9, size=(5, n)).astype(np.float32)
    a = rng.integers(1, 9, size=(5, n)).astype(np.float32)
    got = np.asarray(f(w, a))
    want = [float(np.asarray(cim.CIM.layer_cost(layers, wi, ai)["energy_j"],
                             np.float64).sum()) for wi, ai in zip(w, a)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    policies.append(got)
  assert len(traces) == 1
  # The batched public entry point agrees and the policies differ.
  np.testing.assert_allclose(hardware.batched_policy_cost(cim.CIM, layers, w, a, "energy"),
                             policies[-1], rtol=1e-5)
  assert len(set(np.round(policies[-1], 12))) > 1


@pytest.mark.parametrize("metric", ("latency", "energy", "compute_energy"))
def test_budget_on_cim(metric):
  target = hardware.get_target("cim")
  layers = hardware.from_model("mobilenet_v2_small", num_classes=10, batch=1)
  n = len(layers)
  assert metric in hardware.available_metrics(target, layers)
  # W2A2 is under 3/4 of W8A8 in each metric: the outputs are written at 8
  # bits whatever the policy, which keeps the total energy at 0.61 x W8A8.
  budget = hardware.Budget(metric=metric, value=0.75)
  limit = budget.resolve(target, layers)
  w8a8 = budget.cost(target, layers, np.full(n, 8), np.full(n, 8))
  assert limit == pytest.approx(0.75 * w8a8, rel=1e-12) and limit > 0
  assert not budget.fits(w8a8, limit)
  assert budget.fits(budget.cost(target, layers, np.full(n, 2), np.full(n, 2)), limit)
  same = hardware.Budget(metric=metric, value=1.0, reference="w4a4")
  w4a4 = same.cost(target, layers, np.full(n, 4), np.full(n, 4))
  assert same.fits(w4a4, same.resolve(target, layers))


def _cli(capsys, *flags):
  assert cli.main(["--target=cim", "--model=quickstart_cnn", "--num_classes=10",
                   *flags]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  head = out[0].split(",")
  return [dict(zip(head, r.split(","))) for r in out[1:]]


def test_cli(capsys):
  layers = hardware.from_model("quickstart_cnn", num_classes=10, batch=1)
  base = _cli(capsys, "--w_bits=4", "--a_bits=4")
  assert base[-1]["layer"] == "total" and len(base) == len(layers) + 1
  want = np.asarray(hardware.layer_costs(cim.CIM, layers, 4.0, 4.0)["cycles"])
  assert [float(r["cycles"]) for r in base[:-1]] == pytest.approx(want.tolist(), abs=0.5)
  for r in base:
    parts = sum(float(r[k]) for k in ("compute_energy_pj", "sram_energy_pj",
                                      "dram_energy_pj"))
    assert parts == pytest.approx(float(r["energy_pj"]), rel=1e-6, abs=2)
  # Every field flag reaches the target: a 2-bit DAC halves 4 input cycles,
  # a 6-bit ADC costs more compute energy, a smaller array more crossbars.
  dac = _cli(capsys, "--w_bits=4", "--a_bits=4", "--dac_bits=2")
  assert float(dac[-1]["compute_cycles"]) == pytest.approx(
      float(base[-1]["compute_cycles"]) / 2, abs=1)
  adc = _cli(capsys, "--w_bits=4", "--a_bits=4", "--adc_bits=6")
  assert float(adc[-1]["compute_energy_pj"]) > float(base[-1]["compute_energy_pj"])
  small = _cli(capsys, "--w_bits=4", "--a_bits=4", "--array=32x32", "--cols_per_adc=4")
  assert float(small[-1]["utilization"]) != float(base[-1]["utilization"])
  for field in cim.FLAG_FIELDS:
    default = getattr(cim.CIM, field)
    assert cli.main(["--target=cim", "--model=quickstart_cnn", "--num_classes=10",
                     f"--{field}={default * 2}"]) == 0, field
  capsys.readouterr()


def test_cli_errors(capsys):
  assert cli.main(["--target=systolic", "--model=quickstart_cnn", "--adc_bits=6"]) == 2
  assert "--adc_bits applies to --target=cim only" in capsys.readouterr().err
  assert cli.main(["--target=cim", "--model=quickstart_cnn", "--cols_per_adc=256"]) == 2
  assert "Cim.cols_per_adc is 256" in capsys.readouterr().err


def test_invalid_config():
  with pytest.raises(ValueError, match="Cim.adc_bits is 0"):
    cim.Cim(adc_bits=0)
  with pytest.raises(ValueError, match="Cim.cell_read_fj is -1"):
    hardware.get_target("cim", cell_read_fj=-1.0)


def test_cim_search_recipe():
  # experiments/flags/quickstart_rl_cim.flags: quickstart_rl's search under a
  # cim compute-energy budget of uniform W4A4.
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  config, search = recipes.read_configs("quickstart_rl_cim", (Config, SearchConfig))
  assert (config.mode, config.model, search.target) == ("rl", "quickstart_cnn", "cim")
  budget = search.budget_spec()
  assert (budget.metric, budget.value, budget.reference) == ("compute_energy", 1.0, "w4a4")
  target = hardware.get_target(search.target)
  layers = hardware.from_model(config.model, num_classes=10, batch=target.batch)
  n = len(layers)
  limit = budget.resolve(target, layers)
  assert budget.fits(budget.cost(target, layers, np.full(n, 4), np.full(n, 4)), limit)
  assert not budget.fits(budget.cost(target, layers, np.full(n, 8), np.full(n, 8)), limit)
