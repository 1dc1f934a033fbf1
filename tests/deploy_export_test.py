"""Tests of the deployment exports: StableHLO, encodings.json and ONNX."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.deploy import stablehlo


def _int8_conv(x, w, bias):
  acc = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.int32)
  return jnp.clip(acc + bias, -(2**20), 2**20)


def _conv_args(batch=2):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.integers(-128, 128, (batch, 6, 5, 3)), jnp.int8),
          jnp.asarray(rng.integers(-128, 128, (3, 3, 3, 4)), jnp.int8),
          jnp.asarray(rng.integers(-1000, 1000, (4,)), jnp.int32))


def test_stablehlo_reloads_and_runs_exactly(tmp_path):
  args = _conv_args()
  path = tmp_path / "model.stablehlo"
  size = stablehlo.save_stablehlo(path, jax.jit(_int8_conv), *args)
  assert size == os.path.getsize(path) > 0
  assert os.listdir(tmp_path) == ["model.stablehlo"]
  exported = stablehlo.load_exported(path)
  assert [a.dtype for a in exported.in_avals] == [jnp.int8, jnp.int8, jnp.int32]
  run = stablehlo.load_stablehlo(path)
  out = run(*args)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, _int8_conv(*args))
  with pytest.raises(Exception):  # Shapes are fixed without symbolic_batch.
    run(*_conv_args(batch=3))


def test_stablehlo_symbolic_batch(tmp_path):
  path = tmp_path / "model.stablehlo"
  stablehlo.save_stablehlo(path, _int8_conv, *_conv_args(), symbolic_batch=True,
                           platforms=("cpu", "cuda"))
  assert stablehlo.load_exported(path).platforms == ("cpu", "cuda")
  run = stablehlo.load_stablehlo(path)
  for batch in (1, 5):
    args = _conv_args(batch)
    np.testing.assert_array_equal(run(*args), _int8_conv(*args))
  with pytest.raises(ValueError, match="scalar"):
    stablehlo.export_function(lambda s: s, jnp.int32(1), symbolic_batch=True)
