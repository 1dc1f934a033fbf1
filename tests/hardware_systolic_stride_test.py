"""Tests of conv strides in the systolic scratchpad model.

A model's layers carry their strides into `Layers`, so a strided conv built
from a model costs what the same conv costs from a SCALE-Sim topology (whose
figures `tests/hardware_scalesim_memory_test.py` checks against the
`scalesim` package).
"""

import flax.linen as nn
import numpy as np
import pytest

from haqjax import hardware
from haqjax import models
from haqjax.hardware import model_layers
from haqjax.hardware import topology
from haqjax.nn import QConv
from haqjax.nn import layer_table


def test_zoo_model_layers_carry_its_strides():
  table = layer_table(models.create("resnet20", num_classes=10), (1, 32, 32, 3))
  layers = hardware.from_layer_table(table)
  assert set(table.stride) == {1, 2}
  np.testing.assert_array_equal(layers.stride, table.stride)
  # A 3x3 stride-2 SAME conv of a 32x32 input reads 33 rows (one of
  # padding): SCALE-Sim's IFMAP for 16 outputs; a 1x1 one reads 31.
  i = layers.names.index("layer2_0/conv1")
  assert float(layers.in_h[i]) == 33 and float(layers.in_w[i]) == 33
  assert float(layers.in_elems[i]) == 32 * 32 * 16
  j = layers.names.index("layer2_0/downsample")
  assert float(layers.in_h[j]) == 31
  fc = layers.names.index("fc")
  assert float(layers.stride[fc]) == 1 and float(layers.in_h[fc]) == 1


@pytest.mark.parametrize("size,out,kernel,stride,extent,fits", [
    (32, 16, 3, 2, 33, True),   # SAME: one row of padding
    (12, 5, 3, 2, 11, True),    # VALID: the last row is never read
    (14, 14, 3, 1, 16, True),   # SAME at stride 1
    (14, 14, 3, 2, 29, False),  # a side of stride 1 under a stride of 2
    (14, 4, 3, 2, 9, False),    # a side of stride 3 under a stride of 2
])
def test_read_extent(size, out, kernel, stride, extent, fits):
  e, f = model_layers.read_extent(size, out, kernel, stride)
  assert (int(e), bool(f)) == (extent, fits)


class _Conv(nn.Module):
  features: int
  kernel: int
  stride: int
  padding: str

  @nn.compact
  def __call__(self, x, policy=None, train=False):
    return QConv(self.features, (self.kernel, self.kernel), strides=self.stride,
                 padding=self.padding, name="conv")(x, policy)


# (model input side, channels, filters, kernel, stride, padding) and the
# SCALE-Sim topology row of the same conv (its IFMAP the padded input read).
CASES = {
    "k3_s2_same": ((8, 16, 8, 3, 2, "SAME"), ("c", 9, 9, 3, 3, 16, 8, 2)),
    "k5_s1_same": ((7, 4, 8, 5, 1, "SAME"), ("c", 11, 11, 5, 5, 4, 8, 1)),
    "k3_s2_valid": ((12, 8, 8, 3, 2, "VALID"), ("c", 11, 11, 3, 3, 8, 8, 2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_strided_conv_from_a_model_costs_as_its_topology(name):
  (side, ch, filters, kernel, stride, padding), row = CASES[name]
  model = _Conv(filters, kernel, stride, padding)
  layers = hardware.from_layer_table(layer_table(model, (1, side, side, ch)))
  cells = ", ".join(str(v) for v in row)
  ref = topology.topology_layers(topology.parse_topology(
      ",".join(topology.COLUMNS) + "\n" + cells + "\n"))
  target = hardware.Systolic(rows=8, cols=8, dataflow="is", bandwidth_mode="user",
                             ifmap_sram_bytes=1024, filter_sram_bytes=1024,
                             ofmap_sram_bytes=1024, dram_bytes_per_cycle=2.0)
  got = hardware.layer_costs(target, layers, 8.0, 8.0)
  want = hardware.layer_costs(target, ref, 8.0, 8.0)
  for k in ("compute_cycles", "stall_cycles", "ifmap_dram_bytes", "filter_dram_bytes",
            "ofmap_dram_bytes"):
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
