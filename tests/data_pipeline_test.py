"""Tests of haqjax.data.pipeline: batching, determinism, padding, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from haqjax import data
from haqjax.data import pipeline


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def splits(data_dir):
  return data.load("digits", data_dir=data_dir, val_size=100, split_seed=0)


def _epoch(split, **kwargs):
  return list(data.batches(split, **kwargs))


def _stack(batches, key):
  return np.concatenate([np.asarray(b[key]) for b in batches])


def test_batch_structure_and_normalisation(splits):
  batch = next(data.batches(splits.train, batch_size=32, shuffle=False,
                            drop_remainder=True))
  assert set(batch) == {"image", "label", "mask"}
  assert batch["image"].shape == (32, 8, 8, 1)
  assert batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.float32
  np.testing.assert_array_equal(batch["mask"], 1)
  images, labels = splits.train.load(np.arange(32))
  expected = (images / 255.0 - 0.3053) / 0.3759
  np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(batch["label"], labels)


def test_same_seed_and_epoch_give_same_batches(splits):
  kwargs = dict(batch_size=64, seed=3, epoch=2, shuffle=True,
                drop_remainder=True)
  a, b = _epoch(splits.train, **kwargs), _epoch(splits.train, **kwargs)
  for key in ("image", "label"):
    np.testing.assert_array_equal(_stack(a, key), _stack(b, key))


def test_epoch_and_seed_change_the_order_not_the_content(splits):
  base = dict(batch_size=100, shuffle=True, drop_remainder=False)
  runs = [_epoch(splits.train, seed=0, epoch=0, **base),
          _epoch(splits.train, seed=0, epoch=1, **base),
          _epoch(splits.train, seed=1, epoch=0, **base)]
  labels = [_stack(r, "label")[_stack(r, "mask") > 0] for r in runs]
  assert not np.array_equal(labels[0], labels[1])
  assert not np.array_equal(labels[0], labels[2])
  for other in labels[1:]:
    np.testing.assert_array_equal(np.sort(labels[0]), np.sort(other))


def test_unshuffled_order_is_split_order(splits):
  batches = _epoch(splits.test, batch_size=50, shuffle=False,
                   drop_remainder=False, seed=5, epoch=7)
  np.testing.assert_array_equal(_stack(batches, "label")[:360],
                                splits.test.load(np.arange(360))[1])


def test_last_batch_is_padded_with_mask_zero(splits):
  batches = _epoch(splits.test, batch_size=100, shuffle=True,
                   drop_remainder=False)
  assert len(batches) == 4 == data.num_batches(splits.test, 100, False)
  for b in batches:
    assert b["image"].shape == (100, 8, 8, 1)
  last = batches[-1]
  np.testing.assert_array_equal(last["mask"], [1] * 60 + [0] * 40)
  np.testing.assert_array_equal(last["image"][60:], 0)
  np.testing.assert_array_equal(last["label"][60:], 0)
  assert sum(b["mask"].sum() for b in batches) == 360
  # Every example exactly once.
  dropped = _epoch(splits.test, batch_size=100, shuffle=True,
                   drop_remainder=True)
  assert len(dropped) == 3 == data.steps_per_epoch(splits.test, 100)


def test_start_resumes_mid_epoch(splits):
  kwargs = dict(batch_size=64, seed=4, epoch=3, shuffle=True,
                drop_remainder=True)
  full = _epoch(splits.train, **kwargs)
  rest = _epoch(splits.train, start=5, **kwargs)
  assert len(rest) == len(full) - 5
  for a, b in zip(full[5:], rest):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not _epoch(splits.train, start=len(full), **kwargs)


def test_num_batches():
  assert data.num_batches(10, 3, drop_remainder=True) == 3
  assert data.num_batches(10, 3, drop_remainder=False) == 4
  assert data.num_batches(0, 3, drop_remainder=False) == 0
  assert data.steps_per_epoch(9, 3) == 3
  with pytest.raises(ValueError, match="batch_size is 0; allowed: an int >= 1"):
    data.num_batches(10, 0, drop_remainder=True)


def test_empty_split_yields_nothing(data_dir):
  empty = data.load("digits", data_dir=data_dir, val_size=0).val
  assert len(empty) == 0
  assert not _epoch(empty, batch_size=8, shuffle=True, drop_remainder=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size is 0; allowed: an int >= 1"),
    (dict(batch_size=2.0), "batch_size is 2.0; allowed: an int >= 1"),
    (dict(seed=-1), "seed is -1; allowed: an int >= 0"),
    (dict(epoch=-2), "epoch is -2; allowed: an int >= 0"),
    (dict(prefetch=-1), "prefetch is -1; allowed: an int >= 0"),
    (dict(start=-1), "start is -1; allowed: an int >= 0"),
    (dict(batch_size=500, drop_remainder=True),
     "batch_size is 500 with drop_remainder=True, but split 'test' has 360 "
     "examples"),
    (dict(sharding="data"), "sharding is 'data'; allowed: a "
     "jax.sharding.NamedSharding"),
])
def test_argument_errors_are_raised_eagerly(splits, kwargs, message):
  args = dict(batch_size=8, shuffle=True, drop_remainder=False) | kwargs
  with pytest.raises(ValueError, match=message):
    data.batches(splits.test, **args)


def test_prefetch_gives_the_same_batches(splits):
  kwargs = dict(batch_size=64, seed=1, epoch=0, shuffle=True,
                drop_remainder=False)
  a = _epoch(splits.train, prefetch=0, **kwargs)
  b = _epoch(splits.train, prefetch=2, **kwargs)
  assert len(a) == len(b)
  for key in ("image", "label", "mask"):
    np.testing.assert_array_equal(_stack(a, key), _stack(b, key))


def test_prefetch_forwards_errors():
  def broken():
    yield 1
    raise RuntimeError("boom")
  it = pipeline._prefetch(broken(), 1)
  assert next(it) == 1
  with pytest.raises(RuntimeError, match="boom"):
    next(it)


def test_prefetch_stops_when_abandoned():
  produced = []

  def endless():
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1
  it = pipeline._prefetch(endless(), 1)
  assert next(it) == 0
  it.close()
  count = len(produced)
  import time  # pylint: disable=g-import-not-at-top
  time.sleep(0.3)
  assert len(produced) <= count + 1


def test_sharded_batches_on_a_one_device_mesh(splits):
  mesh = jax.make_mesh((1,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec("data"))
  kwargs = dict(batch_size=100, seed=0, epoch=0, shuffle=True,
                drop_remainder=False)
  sharded = _epoch(splits.test, sharding=sharding, **kwargs)
  plain = _epoch(splits.test, **kwargs)
  assert len(sharded) == len(plain) == 4
  for s, p in zip(sharded, plain):
    for key in ("image", "label", "mask"):
      assert isinstance(s[key], jax.Array)
      assert s[key].shape == p[key].shape
      np.testing.assert_array_equal(np.asarray(s[key]), p[key])
    assert s["image"].sharding == sharding
    assert s["label"].sharding.spec == jax.sharding.PartitionSpec("data")


class _FakeSharding:
  """Stands for one process's view of a multi-process batch sharding."""

  def __init__(self, row_slices):
    self._slices = row_slices

  def addressable_devices_indices_map(self, shape):
    return {i: (s,) + (slice(None),) * (len(shape) - 1)
            for i, s in enumerate(self._slices)}


def test_local_rows_of_a_process():
  # Two local devices holding rows 8:12 and 24:28 of a batch of 32, one of
  # them twice (replicated over a model axis).
  fake = _FakeSharding([slice(24, 28), slice(8, 12), slice(8, 12)])
  np.testing.assert_array_equal(pipeline._local_rows(fake, (32, 8, 8, 1)),
                                list(range(8, 12)) + list(range(24, 28)))
  everything = _FakeSharding([slice(None)])
  np.testing.assert_array_equal(pipeline._local_rows(everything, (6, 2)),
                                np.arange(6))


_MULTI_DEVICE = textwrap.dedent("""
    import jax, numpy as np
    from haqjax import data
    assert jax.device_count() == 4, jax.devices()
    splits = data.load("digits", data_dir={data_dir!r}, val_size=100)
    mesh = jax.make_mesh((4,), ("data",))
    P = jax.sharding.PartitionSpec
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    kw = dict(batch_size=64, seed=2, epoch=1, shuffle=True,
              drop_remainder=False)
    sharded = list(data.batches(splits.test, sharding=sharding, **kw))
    plain = list(data.batches(splits.test, **kw))
    assert len(sharded) == len(plain) == 6
    for s, p in zip(sharded, plain):
      assert len(s["image"].addressable_shards) == 4
      assert s["image"].addressable_shards[0].data.shape == (16, 8, 8, 1)
      for k in p:
        np.testing.assert_array_equal(np.asarray(s[k]), p[k])
    try:
      data.batches(splits.test, sharding=sharding, batch_size=10,
                   shuffle=False, drop_remainder=False)
    except ValueError as e:
      assert "batch_size is 10; allowed: a multiple of 4" in str(e), e
    else:
      raise AssertionError("no error")
    print("OK")
""")


def test_sharded_batches_over_four_devices(data_dir, splits):
  del splits  # Prepared by the fixture, so the child only reads.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _MULTI_DEVICE.format(data_dir=data_dir)],
      env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
