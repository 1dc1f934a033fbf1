"""Tests of bit-packed codes and the packed-weights file."""

import math
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import models
from haqjax.deploy import packing


def _codes(rng, shape, bits, signed):
  lo, hi = packing.code_range(bits, signed)
  return rng.integers(lo, hi + 1, size=shape)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5, 13), (2, 0, 3)])
def test_round_trip_every_width(bits, signed, shape):
  rng = np.random.default_rng(bits)
  codes = _codes(rng, shape, bits, signed)
  if codes.size:  # Both ends of the grid.
    codes.reshape(-1)[:2] = packing.code_range(bits, signed)[:codes.size]
  data = packing.pack_codes(codes, bits, signed=signed)
  assert data.dtype == np.uint8
  assert data.size == math.ceil(codes.size * bits / 8)
  back = packing.unpack_codes(data, bits, signed=signed, shape=shape)
  assert back.dtype == (np.int8 if signed else np.uint8)
  assert back.shape == shape
  np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits,signed,codes,expected", [
    # Least significant bit first, values straddling bytes.
    (1, False, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0b00001101, 0b00000001]),
    (3, False, [5, 3, 7], [0b11011101, 0b00000001]),
    (4, True, [-1, 2, -8], [0x2F, 0x08]),
    (2, True, [-2, 1, 0, -1], [0b11000110]),
    (8, True, [-128, 127], [0x80, 0x7F]),
])
def test_layout_is_little_endian_within_bytes(bits, signed, codes, expected):
  data = packing.pack_codes(np.array(codes), bits, signed=signed)
  np.testing.assert_array_equal(data, expected)


@pytest.mark.parametrize("bits,signed,codes", [
    (4, True, [8]), (4, True, [-9]), (3, False, [-1]), (1, False, [2]),
    (1, True, [1]),
])
def test_codes_off_the_grid_are_refused(bits, signed, codes):
  with pytest.raises(ValueError, match="grid"):
    packing.pack_codes(np.array(codes), bits, signed=signed)


@pytest.mark.parametrize("bits", [0, 9, 2.5])
def test_bits_out_of_range_are_refused(bits):
  with pytest.raises(ValueError, match="bits is"):
    packing.pack_codes(np.zeros(3, int), bits, signed=True)


def test_too_few_bytes_are_refused():
  with pytest.raises(ValueError, match="at least 2"):
    packing.unpack_codes(np.zeros(1, np.uint8), 3, signed=False, shape=(5,))


def _tensor(rng, name, shape, bits, signed=True, axis=-1):
  channels = 1 if axis is None else shape[axis]
  return packing.PackedTensor(
      name=name, codes=_codes(rng, shape, bits, signed), bits=bits, signed=signed,
      scale=rng.uniform(1e-3, 1e-1, channels).astype(np.float32),
      zero_point=_codes(rng, (channels,), bits, signed), axis=axis)


def test_file_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  tensors = [_tensor(rng, "a/kernel", (3, 3, 5, 7), 3),
             _tensor(rng, "b/kernel", (11, 2), 8, signed=False, axis=0),
             _tensor(rng, "c/kernel", (9,), 1, axis=None),
             _tensor(rng, "c/bias", (7,), 32, axis=0)]
  path = tmp_path / "weights.bin"
  size = packing.save_packed(path, tensors)
  assert size == os.path.getsize(path)
  assert os.listdir(tmp_path) == ["weights.bin"]  # No temporary file left.
  back = packing.load_packed(path)
  assert [t.name for t in back] == [t.name for t in tensors]
  for t, u in zip(tensors, back):
    assert (u.bits, u.signed, u.axis) == (t.bits, t.signed, t.axis)
    np.testing.assert_array_equal(u.codes, t.codes)
    np.testing.assert_array_equal(u.scale, t.scale)
    np.testing.assert_array_equal(u.zero_point, t.zero_point)
    assert u.scale.dtype == np.float32


def test_file_errors(tmp_path):
  rng = np.random.default_rng(0)
  t = _tensor(rng, "a", (4, 3), 4)
  with pytest.raises(ValueError, match="repeat"):
    packing.save_packed(tmp_path / "w.bin", [t, t])
  with pytest.raises(ValueError, match="scale of 'a' has shape"):
    packing.PackedTensor(name="a", codes=t.codes, bits=4, signed=True,
                         scale=np.ones(4, np.float32), zero_point=np.zeros(3, int), axis=-1)
  path = tmp_path / "w.bin"
  packing.save_packed(path, [t])
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(ValueError, match="payload bytes"):
    packing.load_packed(path)
  path.write_bytes(b"PK\x03\x04" + bytes(20))
  with pytest.raises(ValueError, match="starts with"):
    packing.load_packed(path)


def _resnet20_kernels():
  model = models.create("resnet20", num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  return {k: v.shape for k, v in sorted(flat.items()) if k.endswith("kernel")}


@pytest.mark.parametrize("policy", ["mixed", "w2", "w8"])
def test_file_size_is_the_bits_plus_the_scales(tmp_path, policy):
  # A ResNet-20's 22 kernels (270,896 weights), per-output-channel scales.
  rng = np.random.default_rng(1)
  kernels = _resnet20_kernels()
  assert len(kernels) == 22
  bits = {"mixed": rng.integers(2, 9, len(kernels)), "w2": [2] * len(kernels),
          "w8": [8] * len(kernels)}[policy]
  tensors = [_tensor(rng, name, shape, int(b)) for (name, shape), b in zip(kernels.items(), bits)]
  size = packing.save_packed(tmp_path / "weights.bin", tensors)
  ideal = sum(b * math.prod(s) for b, s in zip(bits, kernels.values())) / 8
  ideal += 4 * sum(s[-1] for s in kernels.values())
  # Zero points (packed at the codes' width), byte ends and the header on top;
  # at 2 bits (67 kB of codes) they are the largest share.
  assert ideal <= size <= 1.01 * ideal, (size, ideal)
