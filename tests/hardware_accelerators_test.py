"""Tests of the Bit Fusion and BISMO models, and BISMO's fit to HAQ's table."""

import os

import numpy as np
import pytest

from haqjax import hardware
from haqjax.hardware import calibration

HAQ_TABLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "haq",
                         "qmobilenetv2_imagenet100_batch16_latency_table.npy")


def _conv(cin, cout, k, h, stride=1, groups=1, batch=1):
  ho = (h - k) // stride + 1
  return hardware.make_layers(
      names=["a", "b"], in_channels=[3, cin], out_channels=[8, cout],
      kernel_h=[3, k], kernel_w=[3, k], groups=[1, groups], in_h=[8, h],
      in_w=[8, h], out_h=[6, ho], out_w=[6, ho], batch=batch)


@pytest.mark.parametrize("w,a,expected", [
    # B * ceil(OC/M) * Ho*Wo * R*S * ceil(IC/(N*pf)); OC=64, M=32, IC=100, N=16.
    # B=2, ceil(64/32)=2, Ho*Wo=25, R*S=9.
    (8, 8, 2 * 2 * 25 * 9 * 7),       # pf=1: ceil(100/16) = 7
    (4, 4, 2 * 2 * 25 * 9 * 2),       # pf=4: ceil(100/64) = 2
    (2, 2, 2 * 2 * 25 * 9 * 1),       # pf=16: ceil(100/256) = 1
    (1, 8, 2 * 2 * 25 * 9 * 2),       # pf=floor(8/8)*floor(8/2)=4
    (8, 3, 2 * 2 * 25 * 9 * 4),       # pf=floor(8/3)*1=2: ceil(100/32) = 4
])
def test_bitfusion_compute_cycles(w, a, expected):
  # Second layer: IC=100, OC=64, 3x3, 7x7 input -> 5x5 output, batch 2.
  layers = _conv(100, 64, 3, 7, batch=2)
  cycles = hardware.BITFUSION.compute_cycles(layers, w, a)
  assert int(cycles[1]) == expected


def test_bitfusion_first_layer_im2col():
  layers = _conv(100, 64, 3, 7)
  # First layer: B=1, OC=8 -> 1 column tile, 6x6 output, ceil(27/(16*pf)).
  assert int(hardware.BITFUSION.compute_cycles(layers, 8, 8)[0]) == 36 * 2
  assert int(hardware.BITFUSION.compute_cycles(layers, 2, 2)[0]) == 36 * 1


def test_bitfusion_memory_bound_stalls_and_energy():
  layers = _conv(512, 512, 1, 1)   # a dense-like layer: weights dominate
  bf = hardware.BITFUSION
  c = hardware.layer_costs(bf, layers, 8.0, 8.0)
  compute = float(bf.compute_cycles(layers, 8, 8)[1])
  assert float(c["cycles"][1]) == pytest.approx(float(c["dram_bytes"][1]) * 8 / 192)
  assert float(c["cycles"][1]) > compute
  lo = hardware.layer_costs(bf, layers, 2.0, 2.0)
  assert float(lo["energy_j"][1]) < float(c["energy_j"][1])


@pytest.mark.parametrize("name", ["bismo-edge", "bismo-cloud", "bitfusion", "systolic"])
def test_monotone_in_bits(name):
  target = hardware.get_target(name)
  layers = hardware.from_model("quickstart_cnn", num_classes=10, batch=2)
  keys = [k for k in ("cycles", "energy_j", "dram_bytes") if k in
          hardware.layer_costs(target, layers, 8.0, 8.0)]
  t = {k: np.asarray(hardware.cost_tensor(target, layers, metric=m))
       for k, m in (("cycles", "cycles"), ("energy_j", "energy"),
                    ("dram_bytes", "dram")) if k in keys}
  for k, v in t.items():
    assert (np.diff(v, axis=1) >= 0).all(), k
    assert (np.diff(v, axis=2) >= 0).all(), k


def test_bismo_execute_formula():
  layers = _conv(300, 40, 1, 5, batch=2)
  t = hardware.Bismo(dm=8, dn=8, dk=256)
  s = t.stages(layers, 3.0, 5.0)
  # M = 2*25 = 50, N = 40, K = 300.
  assert float(s["execute"][1]) == np.ceil(50 / 8) * 5 * 2 * 3 * 5
  assert float(s["fetch_a"][1]) == 50 * 512 * 5 / 64


def test_bismo_cloud_matches_haq_table():
  if not os.path.exists(HAQ_TABLE):
    pytest.skip("HAQ's table is not in ../shared/data/haq")
  table = np.load(HAQ_TABLE)
  layers = hardware.from_model("mobilenet_v2", num_classes=100, batch=16)
  pred = hardware.cost_tensor(hardware.BISMO_CLOUD, layers, metric="cycles")
  err = calibration.table_errors(pred, table)
  assert err["mean_abs_pct_error"] <= 9.0           # measured 8.94
  assert err["spearman"] >= 0.99                     # measured 0.9937
  for name, e in err["network_pct_error"].items():
    assert abs(e) <= 2.5, name                       # measured -0.85 .. -2.31
  # The table target reproduces HAQ's W8A8 sum.
  tt = hardware.get_target("table:" + HAQ_TABLE)
  assert hardware.uniform_cost(tt, layers, 8, 8, "cycles") == pytest.approx(39_624_933, rel=1e-6)


def test_spearman_with_ties():
  assert calibration.spearman(np.array([1, 2, 2, 3]), np.array([10, 20, 20, 30])) == pytest.approx(1.0)
  assert calibration.spearman(np.arange(5), -np.arange(5)) == pytest.approx(-1.0)
