"""Tests of the digits dataset, and of load() and splits on it."""

import os

import numpy as np
import pytest

from haqjax import data
from haqjax.data import preparation


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits"))


@pytest.fixture(autouse=True)
def _no_user_dirs(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("HAQJAX_DATA_DIR", str(tmp_path / "haqjax"))


def test_counts_shapes_and_values(data_dir):
  splits = data.load("digits", data_dir=data_dir, val_size=0)
  assert len(splits.train) == 1437 and len(splits.test) == 360
  assert not splits.val
  images, labels = splits.train.load(np.arange(len(splits.train)))
  assert images.shape == (1437, 8, 8, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  assert images.min() == 0 and images.max() == 255
  # 0..16 scaled to 0..255: only 17 distinct values.
  assert len(np.unique(images)) == 17
  test_labels = splits.test.load(np.arange(360))[1]
  # Stratified: every class has 35 or 36 test images.
  assert set(np.bincount(test_labels, minlength=10)) <= {35, 36, 37}
  assert set(np.unique(labels)) == set(range(10))


def test_prepared_once_and_reused(data_dir):
  data.load("digits", data_dir=data_dir)
  path = data.prepare("digits", data_dir=data_dir).path
  assert path == os.path.join(data_dir, "haqjax_digits", "1.0.0")
  mtime = os.path.getmtime(os.path.join(path, "dataset_info.json"))
  data.prepare("digits", data_dir=data_dir)
  assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == mtime
  assert not [p for p in os.listdir(os.path.dirname(path))
              if p.startswith("incomplete")]


def test_stale_incomplete_dir_is_removed(tmp_path):
  stale = tmp_path / "haqjax_digits" / "incomplete.ABCDEF_1.0.0"
  stale.mkdir(parents=True)
  (stale / "half-written").write_text("x")
  data.prepare("digits", data_dir=str(tmp_path))
  assert not stale.exists()
  assert (tmp_path / "haqjax_digits" / "1.0.0" / "dataset_info.json").exists()


def test_default_data_dir_from_env(monkeypatch, tmp_path):
  monkeypatch.setenv("HAQJAX_DATA_DIR", str(tmp_path / "x"))
  assert data.default_data_dir() == str(tmp_path / "x")
  monkeypatch.delenv("HAQJAX_DATA_DIR")
  assert data.default_data_dir() == os.path.expanduser(
      "~/.cache/haqjax/datasets")


def test_val_is_disjoint_from_train_and_depends_on_split_seed_only(data_dir):
  a = data.load("digits", data_dir=data_dir, val_size=200, split_seed=0)
  b = data.load("digits", data_dir=data_dir, val_size=200, split_seed=0)
  c = data.load("digits", data_dir=data_dir, val_size=200, split_seed=1)
  assert len(a.val) == 200 and len(a.train) == 1237
  assert not set(a.val.rows) & set(a.train.rows)
  assert sorted(set(a.val.rows) | set(a.train.rows)) == list(range(1437))
  np.testing.assert_array_equal(a.val.rows, b.val.rows)
  assert set(a.val.rows) != set(c.val.rows)
  # Training seeds change the order of batches, never which examples are val.
  seen = set()
  for seed in (0, 1, 2):
    for batch in data.batches(a.train, batch_size=100, seed=seed, epoch=0,
                              shuffle=True, drop_remainder=False):
      seen.update(map(bytes, batch["image"][batch["mask"] > 0]))
  val_images = a.val.load(np.arange(len(a.val)))[0]
  train_images = {bytes(x) for x in a.train.load(np.arange(len(a.train)))[0]}
  # Images that occur only in val never appear in a training batch.
  only_val = {bytes(x) for x in val_images} - train_images
  assert only_val and not {bytes(data.transforms.normalize(
      np.frombuffer(x, np.uint8).reshape(8, 8, 1), a.spec.mean,
      a.spec.std)) for x in only_val} & seen


@pytest.mark.parametrize("val_size, expected", [
    (0, 0), (1, 1), (0.1, 144), (np.int64(7), 7), (None, 144), (0.0, 0),
    (300.0, 300), (np.float32(0.5), 718)])
def test_val_size(data_dir, val_size, expected):
  splits = data.load("digits", data_dir=data_dir, val_size=val_size)
  assert len(splits.val) == expected
  assert len(splits.train) == 1437 - expected


@pytest.mark.parametrize("val_size", [-1, 1437, 1e9, 1.5, -0.5, True, "10",
                                      float("nan")])
def test_val_size_out_of_range(data_dir, val_size):
  with pytest.raises(ValueError, match=r"val_size is .*; allowed: a count in "
                     r"0\.\.1436 or a fraction in \(0, 1\)"):
    data.load("digits", data_dir=data_dir, val_size=val_size)


@pytest.mark.parametrize("kwargs, message", [
    ({"split_seed": -1}, "split_seed is -1; allowed: an int >= 0"),
    ({"split_seed": 1.5}, "split_seed is 1.5; allowed: an int >= 0"),
    ({"num_workers": 0}, "num_workers is 0; allowed: an int >= 1"),
])
def test_load_argument_errors(data_dir, kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.load("digits", data_dir=data_dir, **kwargs)


def test_unknown_dataset_in_load(data_dir):
  with pytest.raises(ValueError, match="dataset 'mnist' is unknown"):
    data.load("mnist", data_dir=data_dir)


def test_in_memory_copy_is_shared_and_read_only(data_dir):
  a = data.load("digits", data_dir=data_dir)
  b = data.load("digits", data_dir=data_dir, val_size=0)
  assert a.train.source is b.train.source
  with pytest.raises(ValueError):
    a.train.source.images[0, 0, 0, 0] = 1


def test_cli_prepares(tmp_path, capsys):
  from haqjax.data import __main__ as cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["digits", f"--data_dir={tmp_path}"]) == 0
  assert "digits: " in capsys.readouterr().out
  assert preparation.BUILDERS["digits"](
      data_dir=str(tmp_path)).is_prepared()
