"""Tests of the Fashion-MNIST builder on fake idx files and on the real ones."""

import gzip
import os

import numpy as np
import pytest

from haqjax import data
from haqjax.data import fashion_mnist

REAL_DIR = fashion_mnist.DEBIAN_DIR


@pytest.fixture(autouse=True)
def _no_user_dirs(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("HAQJAX_DATA_DIR", str(tmp_path / "haqjax"))


def _idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write(path, contents: bytes, gz: bool):
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(contents)
  else:
    with open(path, "wb") as f:
      f.write(contents)


def _fake_manual_dir(directory, gz: bool, num_train=30, num_test=10):
  rng = np.random.default_rng(0)
  arrays = {}
  os.makedirs(directory, exist_ok=True)
  for split, n in (("train", num_train), ("test", num_test)):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images_file, labels_file = fashion_mnist.FILES[split]
    _write(os.path.join(directory, images_file), _idx_bytes(images), gz)
    _write(os.path.join(directory, labels_file), _idx_bytes(labels), gz)
    arrays[split] = (images, labels)
  return arrays


def _sorted_by_bytes(images, labels):
  order = sorted(range(len(labels)), key=lambda i: images[i].tobytes())
  return images[order], labels[order]


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_fake_idx_files(tmp_path, gz):
  manual = tmp_path / "manual"
  arrays = _fake_manual_dir(manual, gz)
  splits = data.load("fashion_mnist", data_dir=str(tmp_path / "d"),
                     manual_dir=str(manual), val_size=5)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 5, 10)
  for split, source in (("test", splits.test), ("train", None)):
    if source is None:  # train + val together are the training set.
      parts = [s.load(np.arange(len(s))) for s in (splits.train, splits.val)]
      got = (np.concatenate([p[0] for p in parts]),
             np.concatenate([p[1] for p in parts]))
    else:
      got = source.load(np.arange(len(source)))
    assert got[0].shape[1:] == (28, 28, 1) and got[0].dtype == np.uint8
    want_images, want_labels = arrays[split]
    got_sorted = _sorted_by_bytes(got[0][..., 0], got[1])
    want_sorted = _sorted_by_bytes(want_images, want_labels)
    np.testing.assert_array_equal(got_sorted[0], want_sorted[0])
    np.testing.assert_array_equal(got_sorted[1], want_sorted[1])
  batch = next(data.batches(splits.train, batch_size=8, shuffle=True,
                            drop_remainder=True, augment=True))
  assert batch["image"].shape == (8, 28, 28, 1)


@pytest.mark.skipif(not os.path.isdir(REAL_DIR), reason=f"no {REAL_DIR}")
def test_real_files_from_debian_package(tmp_path):
  splits = data.load("fashion_mnist", data_dir=str(tmp_path), val_size=0)
  assert len(splits.train) == 60000 and len(splits.test) == 10000
  for split in (splits.train, splits.test):
    labels = split.source.labels
    assert labels.min() == 0 and labels.max() == 9
    np.testing.assert_array_equal(np.bincount(labels), len(split) // 10)
  assert splits.train.source.images.shape == (60000, 28, 28, 1)


def test_missing_files_error_names_places_and_command(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist.FashionMnistBuilder, "STANDARD_DIRS",
                      (str(tmp_path / "usr-share"),))
  empty = tmp_path / "empty"
  empty.mkdir()
  data_dir = tmp_path / "d"
  with pytest.raises(data.DataNotFoundError) as e:
    data.load("fashion_mnist", data_dir=str(data_dir), manual_dir=str(empty))
  message = str(e.value)
  assert isinstance(e.value, ValueError)
  assert "\n" not in message
  assert message.startswith("dataset 'fashion_mnist': ")
  for place in (empty, tmp_path / "usr-share", data_dir / "downloads/manual",
                data_dir / "haqjax_fashion_mnist/1.0.0", tmp_path / "tfds"):
    assert str(place) in message
  assert "`apt-get install dataset-fashion-mnist`" in message
  assert "--manual_dir=DIR" in message
  assert not (data_dir / "haqjax_fashion_mnist").exists()


def test_incomplete_manual_dir_is_skipped(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist.FashionMnistBuilder, "STANDARD_DIRS", ())
  manual = tmp_path / "manual"
  _fake_manual_dir(manual, gz=True)
  os.remove(manual / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(data.DataNotFoundError, match=str(manual)):
    data.load("fashion_mnist", data_dir=str(tmp_path / "d"),
              manual_dir=str(manual))


def _corrupt(manual, name, how):
  path = os.path.join(manual, name + ".gz")
  with open(path, "rb") as f:
    contents = f.read()
  if how == "truncated gzip":
    contents = contents[:len(contents) // 2]
  else:
    raw = gzip.decompress(contents)
    raw = {"bad magic": b"\x00\x00\x08\x07" + raw[4:],
           "truncated data": raw[:-100],
           "trailing data": raw + b"\x00"}[how]
    contents = gzip.compress(raw)
  with open(path, "wb") as f:
    f.write(contents)
  return path


@pytest.mark.parametrize("how, message", [
    ("truncated gzip", "is not a readable gzip file"),
    ("bad magic", "has magic number 00000807; expected 00000803"),
    ("truncated data",
     "bytes; its header (30, 28, 28) needs 23536 (truncated)"),
    ("trailing data", "(trailing data)"),
])
def test_corrupt_idx_file_is_a_clear_error(tmp_path, how, message):
  manual = tmp_path / "manual"
  _fake_manual_dir(manual, gz=True)
  path = _corrupt(manual, "train-images-idx3-ubyte", how)
  with pytest.raises(data.CorruptDataError) as e:
    data.load("fashion_mnist", data_dir=str(tmp_path / "d"),
              manual_dir=str(manual))
  assert path in str(e.value) and message in str(e.value)
  # Nothing half-written is left to be read later.
  assert not (tmp_path / "d" / "haqjax_fashion_mnist" / "1.0.0").exists()


def test_images_and_labels_must_match(tmp_path):
  manual = tmp_path / "manual"
  _fake_manual_dir(manual, gz=False)
  _write(manual / "t10k-labels-idx1-ubyte", _idx_bytes(np.zeros(9)), gz=False)
  with pytest.raises(data.CorruptDataError, match="holds 10 images but .* "
                     "holds 9 labels"):
    fashion_mnist.read_split(str(manual), "test")
  _write(manual / "t10k-labels-idx1-ubyte", _idx_bytes(np.full(10, 10)),
         gz=False)
  with pytest.raises(data.CorruptDataError, match="holds label 10; expected"):
    fashion_mnist.read_split(str(manual), "test")
