"""Tests of the CIFAR-10 builder on a fake archive, and of its augmentation."""

import io
import os
import pickle
import tarfile

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from haqjax import data
from haqjax.data import cifar10
from haqjax.data import transforms

NUM_TRAIN_PER_BATCH = 4
NUM_TEST = 6


@pytest.fixture(autouse=True)
def _no_user_dirs(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("HAQJAX_DATA_DIR", str(tmp_path / "haqjax"))


def _fake_batches(seed=0):
  """{batch name: (images [N, 32, 32, 3], labels [N])}."""
  rng = np.random.default_rng(seed)
  out = {}
  for name in cifar10.SPLITS["train"] + cifar10.SPLITS["test"]:
    n = NUM_TEST if name == "test_batch" else NUM_TRAIN_PER_BATCH
    out[name] = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 rng.integers(0, 10, n))
  return out


def _pickle(images, labels, name) -> bytes:
  # The layout of the real files: rows of 1024 R, 1024 G, 1024 B values.
  rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  return pickle.dumps({b"batch_label": name.encode(), b"labels": list(labels),
                       b"data": rows,
                       b"filenames": [b"x.png"] * len(labels)}, protocol=2)


def _write_archive(directory, batches, skip=()):
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, cifar10.ARCHIVE)
  with tarfile.open(path, "w:gz") as tar:
    for name, (images, labels) in batches.items():
      if name in skip:
        continue
      contents = _pickle(images, labels, name)
      info = tarfile.TarInfo(f"{cifar10.BATCHES_DIR}/{name}")
      info.size = len(contents)
      tar.addfile(info, io.BytesIO(contents))
  return path


def _all(split):
  return split.load(np.arange(len(split)))


def _as_set(images, labels):
  return {(x.tobytes(), int(y)) for x, y in zip(images, labels)}


def _expected(batches, split):
  names = cifar10.SPLITS[split]
  return _as_set(np.concatenate([batches[n][0] for n in names]),
                 np.concatenate([batches[n][1] for n in names]))


@pytest.mark.parametrize("layout", ["archive", "unpacked"])
def test_fake_cifar10(tmp_path, layout):
  batches = _fake_batches()
  manual = tmp_path / "manual"
  if layout == "archive":
    _write_archive(manual, batches)
  else:
    for name, (images, labels) in batches.items():
      (manual / cifar10.BATCHES_DIR).mkdir(parents=True, exist_ok=True)
      (manual / cifar10.BATCHES_DIR / name).write_bytes(
          _pickle(images, labels, name))
  splits = data.load("cifar10", data_dir=str(tmp_path / "d"),
                     manual_dir=str(manual), val_size=0.25)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 6)
  train = _as_set(*_all(splits.train)) | _as_set(*_all(splits.val))
  assert train == _expected(batches, "train")
  assert _as_set(*_all(splits.test)) == _expected(batches, "test")
  batch = next(data.batches(splits.test, batch_size=4, shuffle=False,
                            drop_remainder=False))
  assert batch["image"].shape == (4, 32, 32, 3)


def test_pad_crop_flip_is_deterministic_and_a_crop(tmp_path):
  manual = tmp_path / "manual"
  _write_archive(manual, _fake_batches())
  splits = data.load("cifar10", data_dir=str(tmp_path / "d"),
                     manual_dir=str(manual), val_size=0)
  plain = splits.train.load(np.arange(20))[0]

  def augmented(seed, epoch):
    return splits.train.load(np.arange(20), augment=True, seed=seed,
                             epoch=epoch)[0]

  np.testing.assert_array_equal(augmented(0, 0), augmented(0, 0))
  assert not np.array_equal(augmented(0, 0), augmented(0, 1))
  assert not np.array_equal(augmented(0, 0), augmented(1, 0))
  # Each augmented image is a (possibly mirrored) window of the padded one.
  out = augmented(3, 2)
  offsets, flips = transforms.pad_crop_flip_params(3, 2, np.arange(20), 20)
  padded = np.pad(plain, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(20):
    dy, dx = offsets[i]
    window = padded[i, dy:dy + 32, dx:dx + 32]
    np.testing.assert_array_equal(out[i],
                                  window[:, ::-1] if flips[i] else window)
  # Same (seed, epoch, example) -> same augmentation, whatever the batch.
  np.testing.assert_array_equal(
      splits.train.load(np.array([7, 2]), augment=True, seed=3, epoch=2)[0],
      out[[7, 2]])
  batch = next(data.batches(splits.train, batch_size=20, shuffle=False,
                            drop_remainder=True, augment=True, seed=3, epoch=2))
  np.testing.assert_allclose(
      batch["image"],
      transforms.normalize(out, splits.spec.mean, splits.spec.std))


def test_missing_archive_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(data.DataNotFoundError) as e:
    data.load("cifar10", data_dir=str(tmp_path / "d"), manual_dir=str(empty))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("dataset 'cifar10': cifar-10-python.tar.gz")
  assert str(empty) in message
  assert str(tmp_path / "d" / "downloads" / "manual") in message
  assert ("`wget -P DIR https://www.cs.toronto.edu/~kriz/"
          "cifar-10-python.tar.gz`") in message


def test_cli_reports_missing_data_in_one_line(tmp_path, capsys):
  from haqjax.data import __main__ as cli  # pylint: disable=g-import-not-at-top
  empty = tmp_path / "empty"
  empty.mkdir()
  assert cli.main(["cifar10", f"--data_dir={tmp_path / 'd'}",
                   f"--manual_dir={empty}"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: dataset 'cifar10': ") and err.count("\n") == 1


def test_archive_without_test_batch(tmp_path):
  manual = tmp_path / "manual"
  _write_archive(manual, _fake_batches(), skip=("test_batch",))
  with pytest.raises(data.CorruptDataError, match="lacks test_batch"):
    data.load("cifar10", data_dir=str(tmp_path / "d"), manual_dir=str(manual))


def test_pickle_that_runs_code_is_refused(tmp_path):

  class Evil:

    def __reduce__(self):
      return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

  batches = _fake_batches()
  manual = tmp_path / "manual" / cifar10.BATCHES_DIR
  manual.mkdir(parents=True)
  for name, (images, labels) in batches.items():
    (manual / name).write_bytes(_pickle(images, labels, name))
  (manual / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
  with pytest.raises(data.CorruptDataError, match="refusing to load"):
    data.load("cifar10", data_dir=str(tmp_path / "d"),
              manual_dir=str(manual.parent))
  assert not (tmp_path / "pwned").exists()


class _TfdsCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes what tfds's own `cifar10` writes: PNG images, array_record."""

  name = "cifar10"
  VERSION = tfds.core.Version("3.0.2")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(
                names=data.get_spec("cifar10").class_names),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    batches = _fake_batches(seed=1)
    return {"train": self._generate_examples(batches["data_batch_1"]),
            "test": self._generate_examples(batches["test_batch"])}

  def _generate_examples(self, arrays):
    for i, (image, label) in enumerate(zip(*arrays)):
      png = io.BytesIO()
      PIL.Image.fromarray(image).save(png, format="PNG")
      yield i, {"id": f"x_{i}", "image": png.getvalue(), "label": int(label)}


def test_reads_tfds_own_prepared_copy(tmp_path, monkeypatch):
  tfds_dir = tmp_path / "tfds"
  monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
  _TfdsCifar10(data_dir=str(tfds_dir), file_format="array_record"
               ).download_and_prepare(
                   download_config=tfds.download.DownloadConfig(
                       try_download_gcs=False))
  splits = data.load("cifar10", data_dir=str(tmp_path / "d"), val_size=1)
  batches = _fake_batches(seed=1)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 1, 6)
  assert _as_set(*_all(splits.test)) == _as_set(*batches["test_batch"])
  assert not (tmp_path / "d" / "haqjax_cifar10").exists()
