"""Tests of the systolic-array model against SCALE-Sim's compute model."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import hardware
from haqjax.hardware import systolic
from haqjax.hardware import topology

TOPOLOGY = """Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, Num Filter, Strides,
Conv1, 10, 10, 3, 3, 4, 8, 1,
Conv2, 9, 9, 3, 3, 8, 12, 2,
Conv3 DP, 8, 8, 3, 3, 3, 1, 1,
PW, 5, 5, 1, 1, 12, 20, 1,
FC, 1, 1, 1, 1, 40, 10, 1,
"""

# (M, N, K, rows, cols) -> SCALE-Sim stall-free cycles (demand-matrix rows of
# scalesim.compute.systolic_compute_{os,ws,is}), pinned so the test runs
# without the package too.
PINNED = {
    ("os", 5, 3, 7, 4, 4): 26, ("os", 16, 8, 9, 4, 8): 76,
    ("os", 9, 20, 3, 8, 4): 130, ("os", 33, 17, 12, 8, 8): 390,
    ("ws", 5, 3, 7, 4, 4): 30, ("ws", 16, 8, 9, 4, 8): 90,
    ("ws", 9, 20, 3, 8, 4): 135, ("ws", 33, 17, 12, 8, 8): 330,
    ("is", 5, 3, 7, 4, 4): 52, ("is", 16, 8, 9, 4, 8): 132,
    ("is", 9, 20, 3, 8, 4): 114, ("is", 33, 17, 12, 8, 8): 390,
}


def _scalesim_cycles(dataflow, m, n, k, rows, cols):
  from scalesim.compute import systolic_compute_is  # pylint: disable=g-import-not-at-top
  from scalesim.compute import systolic_compute_os  # pylint: disable=g-import-not-at-top
  from scalesim.compute import systolic_compute_ws  # pylint: disable=g-import-not-at-top
  from scalesim.scale_config import scale_config  # pylint: disable=g-import-not-at-top
  cfg = scale_config()
  cfg.array_rows, cfg.array_cols, cfg.valid_conf_flag = rows, cols, True
  cls = {"os": systolic_compute_os.systolic_compute_os,
         "ws": systolic_compute_ws.systolic_compute_ws,
         "is": systolic_compute_is.systolic_compute_is}[dataflow]
  c = cls()
  c.set_params(config_obj=cfg,
               ifmap_op_mat=np.arange(m * k).reshape(m, k),
               filter_op_mat=np.arange(k * n).reshape(k, n) + 10**6,
               ofmap_op_mat=np.arange(m * n).reshape(m, n) + 2 * 10**6)
  c.create_demand_matrices()
  return c.ifmap_demand_matrix.shape[0]


def _ours(dataflow, m, n, k, rows, cols):
  cycles, _ = systolic.fold_cycles(dataflow, rows, cols, jnp.float32(m),
                                   jnp.float32(n), jnp.float32(k))
  return int(cycles)


@pytest.mark.parametrize("key", sorted(PINNED))
def test_fold_cycles_pinned(key):
  assert _ours(*key) == PINNED[key]


@pytest.mark.parametrize("dataflow", systolic.DATAFLOWS)
def test_fold_cycles_equal_scalesim(dataflow):
  pytest.importorskip("scalesim")
  rng = np.random.default_rng(0)
  for _ in range(12):
    m, n, k = rng.integers(1, 40, size=3)
    rows, cols = rng.choice([2, 4, 8, 16], size=2)
    assert _ours(dataflow, m, n, k, rows, cols) == _scalesim_cycles(
        dataflow, m, n, k, rows, cols), (m, n, k, rows, cols)


@pytest.mark.parametrize("dataflow", systolic.DATAFLOWS)
def test_topology_layers_equal_scalesim(dataflow, tmp_path):
  pytest.importorskip("scalesim")
  from scalesim.topology_utils import topologies  # pylint: disable=g-import-not-at-top
  path = tmp_path / "net.csv"
  path.write_text(TOPOLOGY)
  topo = topologies()
  topo.load_arrays(str(path))
  # SCALE-Sim splits a DP layer into one layer per channel.
  expected = {}
  for i in range(topo.get_num_layers()):
    name = topo.get_layer_name(i).split("Channel_")[0]
    ho, wo = topo.get_layer_ofmap_dims(i)
    m, k = int(ho * wo), int(topo.get_layer_window_size(i))
    n = int(topo.get_layer_num_filters(i))
    expected[name] = expected.get(name, 0) + _scalesim_cycles(dataflow, m, n, k, 4, 8)
  target = hardware.Systolic(rows=4, cols=8, dataflow=dataflow,
                             dram_bytes_per_cycle=1e9)
  layers = topology.read_topology(str(path))
  cycles = hardware.layer_costs(target, layers, 8.0, 8.0)["cycles"]
  assert dict(zip(layers.names, np.asarray(cycles).astype(int).tolist())) == expected


def test_bit_modes_scale_the_stream():
  layers = hardware.make_layers(names=["l"], in_channels=[16], out_channels=[16],
                                kernel_h=[1], kernel_w=[1], groups=[1], in_h=[4],
                                in_w=[4], out_h=[4], out_w=[4], batch=1)
  big = dict(dram_bytes_per_cycle=1e9, rows=4, cols=4)
  cyc = lambda mode, w, a: float(hardware.layer_costs(
      hardware.Systolic(bit_mode=mode, **big), layers, w, a)["cycles"][0])
  # os: M=16, N=16, K=16 on 4x4: 16 folds of (T + 6).
  assert cyc("parallel", 2, 3) == cyc("parallel", 8, 8) == 16 * (16 + 6)
  assert cyc("stripes", 8, 3) == 16 * (16 * 3 + 6)
  assert cyc("loom", 2, 3) == 16 * (16 * 6 + 6)
  assert cyc("fused", 2, 2) == 16 * (1 + 6)    # 16 products per cycle
  assert cyc("fused", 4, 4) == 16 * (4 + 6)


def test_roofline_and_energy_grow_with_bits():
  layers = hardware.from_model("quickstart_cnn", num_classes=10)
  slow = hardware.Systolic(dram_bytes_per_cycle=0.01)
  lo = hardware.layer_costs(slow, layers, 2.0, 2.0)
  hi = hardware.layer_costs(slow, layers, 8.0, 8.0)
  assert (np.asarray(hi["cycles"]) > np.asarray(lo["cycles"])).all()
  assert (np.asarray(hi["energy_j"]) > np.asarray(lo["energy_j"])).all()
  assert (np.asarray(hi["dram_bytes"]) > np.asarray(lo["dram_bytes"])).all()


def test_topology_conventions_and_errors(tmp_path):
  rows = topology.parse_topology(TOPOLOGY)
  assert [r["out_h"] for r in rows] == [8, 4, 6, 5, 1]
  assert rows[1]["out_h"] == math.ceil((9 - 3 + 2) / 2)
  layers = topology.topology_layers(rows)
  np.testing.assert_array_equal(layers.groups, [1, 1, 3, 1, 1])
  np.testing.assert_array_equal(layers.k, [36, 72, 9, 12, 40])
  np.testing.assert_array_equal(layers.stride, [1, 2, 1, 1, 1])
  g = layers.conv_geometry
  np.testing.assert_array_equal(g["kernel_w"], [3, 3, 3, 1, 1])
  np.testing.assert_array_equal(g["channels"], [4, 8, 1, 12, 40])
  np.testing.assert_array_equal(g["out_w"], [8, 4, 6, 5, 1])
  np.testing.assert_array_equal(g["in_h"], [10, 9, 8, 5, 1])
  # Built without strides: unknown (0), and the walk keeps its block model.
  plain = hardware.make_layers(names=["l"], in_channels=[4], out_channels=[8],
                               kernel_h=[3], kernel_w=[3], groups=[1], in_h=[10],
                               in_w=[10], out_h=[8], out_w=[8], batch=1)
  np.testing.assert_array_equal(plain.stride, [0])
  with pytest.raises(ValueError, match="stride has 2 entries; expected 1"):
    hardware.make_layers(names=["l"], in_channels=[4], out_channels=[8],
                         kernel_h=[3], kernel_w=[3], groups=[1], in_h=[10],
                         in_w=[10], out_h=[8], out_w=[8], batch=1, stride=[1, 2])
  with pytest.raises(ValueError, match="Channels is 'x'"):
    topology.parse_topology("h\nL, 4, 4, 1, 1, x, 2, 1,\n", "f.csv")
  with pytest.raises(ValueError, match="larger than the IFMAP"):
    topology.parse_topology("h\nL, 2, 2, 3, 3, 1, 2, 1,\n")
  with pytest.raises(ValueError, match="does not exist"):
    topology.read_topology(str(tmp_path / "missing.csv"))


def test_config_validation():
  with pytest.raises(ValueError, match="Systolic.dataflow is 'rs'"):
    hardware.Systolic(dataflow="rs")
  with pytest.raises(ValueError, match="Systolic.rows is 0"):
    hardware.Systolic(rows=0)
  with pytest.raises(ValueError, match="has no field 'depth'"):
    hardware.get_target("systolic", depth=3)
  assert hardware.get_target("systolic", rows=128).rows == 128
