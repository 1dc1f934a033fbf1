"""Tests of AdaRound over a whole model, and of the module's re-exports."""

from __future__ import annotations

import jax
import numpy as np
from absl.testing import parameterized

from haqjax import models
from haqjax.nn.table import layer_table
from haqjax.policy import Policy
from haqjax.ptq import adaround
from haqjax.ptq import layer_geometry
from haqjax.ptq import layer_rounding
from haqjax.quant.affine import AffineSpec
from haqjax.quant.uniform import StaticRange

SPEC = AffineSpec(channel_axis=-1)


class AdaRoundModelTest(parameterized.TestCase):

  @parameterized.named_parameters(("parallel", False), ("sequential", True))
  def test_digits_cnn(self, sequential):
    model = models.create("digits_cnn", num_classes=10)
    images = jax.nn.relu(jax.random.normal(jax.random.key(0), (64, 8, 8, 1)))
    variables = model.init(jax.random.key(1), images[:1])
    names = layer_table(model, (1, 8, 8, 1)).names
    policy = Policy.create(names, w_bits=[32, 3, 4], a_bits=32)
    res = adaround.adaround_model(jax.random.key(2), model, variables,
                                  [images[:32], images[32:]], policy,
                                  sequential=sequential, iters=300)
    self.assertEqual(sorted(res.ranges), sorted(names[1:]))
    np.testing.assert_array_equal(res.variables["params"][names[0]]["kernel"],
                                  variables["params"][names[0]]["kernel"])
    quantizer = StaticRange(spec=SPEC, sign="signed")
    for name, bits in zip(names[1:], (3, 4)):
      w = res.variables["params"][name]["kernel"]
      again = quantizer(res.ranges[name], w, bits)
      np.testing.assert_allclose(again, w, rtol=0, atol=1e-7)
      # After 30 steps the rounding is still the fractional part (nearest up
      # to ties); by 300 it has learned (about a third of nearest's loss).
      self.assertLess(float(res.infos[name].recon_adaround),
                      float(res.infos[name].recon_nearest))

  def test_per_layer_api_is_reexported(self):
    self.assertIs(adaround.adaround_layer, layer_rounding.adaround_layer)
    self.assertIs(adaround.AdaRoundInfo, layer_rounding.AdaRoundInfo)
    self.assertIs(adaround.LayerGeometry, layer_geometry.LayerGeometry)
    self.assertIs(adaround.layer_geometries, layer_geometry.layer_geometries)
    self.assertEqual(adaround.DEFAULT_ITERS, layer_rounding.DEFAULT_ITERS)
