"""Tests of the layer geometry: its map, its im2col view and its validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from haqjax import models
from haqjax.ptq.layer_geometry import LayerGeometry
from haqjax.ptq.layer_geometry import group_kernel
from haqjax.ptq.layer_geometry import layer_geometries
from haqjax.ptq.layer_geometry import patches


class LayerGeometryTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("conv_same", LayerGeometry(kind="conv"), (2, 6, 6, 4), (3, 3, 4, 6)),
      ("conv_strided_padded", LayerGeometry(kind="conv", strides=2,
                                            padding=((1, 1), (1, 1))),
       (2, 7, 7, 4), (3, 3, 4, 6)),
      ("conv_grouped_valid", LayerGeometry(kind="conv", padding="VALID", groups=2),
       (2, 6, 6, 4), (3, 3, 2, 6)),
      ("depthwise", LayerGeometry(kind="conv", groups=4), (2, 5, 5, 4), (3, 3, 1, 4)),
      ("dense", LayerGeometry(kind="dense"), (5, 4), (4, 6)),
  )
  def test_patches_times_grouped_kernel_is_the_layer(self, geometry, x_shape, k_shape):
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, x_shape)
    kernel = jax.random.normal(k2, k_shape)
    want = geometry.apply(x, kernel)
    p = patches(x, geometry, kernel.shape)  # [rows, g, k]
    wg = group_kernel(kernel, geometry)  # [g, k, out/g]
    got = jnp.einsum("rgk,gko->rgo", p, wg, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)

  def test_normalises_strides_and_padding(self):
    geometry = LayerGeometry(kind="conv", strides=2, padding=[[1, 0], [0, 1]])
    self.assertEqual(geometry.strides, (2, 2))
    self.assertEqual(geometry.padding, ((1, 0), (0, 1)))
    hash(geometry)  # a static jit argument

  @parameterized.named_parameters(
      ("kind", {"kind": "pool"}, "kind is 'pool'"),
      ("strides", {"strides": (1, 0)}, "strides is"),
      ("groups", {"groups": 0}, "groups is 0"),
  )
  def test_bad_fields(self, fields, message):
    with pytest.raises(ValueError, match=message):
      LayerGeometry(**fields)

  def test_layer_geometries_of_a_model(self):
    model = models.create("digits_cnn", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    found = layer_geometries(model, variables, jnp.zeros((4, 8, 8, 1)))
    self.assertEqual(list(found), ["stem", "conv1", "classifier"])
    self.assertEqual(found["stem"], LayerGeometry(kind="conv", padding=((1, 1), (1, 1))))
    self.assertEqual(found["conv1"], LayerGeometry(kind="conv", strides=2,
                                                   padding=((1, 1), (1, 1))))
    self.assertEqual(found["classifier"], LayerGeometry(kind="dense"))
