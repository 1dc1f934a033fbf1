"""CIFAR-10 from its "python version" archive, as a tfds builder.

50,000 training and 10,000 test colour 32x32 images of 10 classes. The source
is `cifar-10-python.tar.gz` from the dataset's home page, or the directory
`cifar-10-batches-py/` it unpacks to. The batches are Python pickles; they are
read with an unpickler that only builds numpy arrays, so a tampered file cannot
run code.

References:
  Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
  technical report, University of Toronto, 2009.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib

import numpy as np
import tensorflow_datasets as tfds

from haqjax.data import builders
from haqjax.data import errors

ARCHIVE = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
SPLITS = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_ALL_BATCHES = SPLITS["train"] + SPLITS["test"]


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles dicts, lists, bytes and numpy arrays; refuses anything else."""

  _ALLOWED = {
      ("numpy", "ndarray"), ("numpy", "dtype"),
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"),
      ("numpy._core.multiarray", "scalar"),
      ("_codecs", "encode"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    if module == "numpy.core.multiarray":  # Old pickles; renamed in numpy 2.
      module = "numpy._core.multiarray" if hasattr(np, "_core") else module
    return super().find_class(module, name)


def _batches_dir(directory: str) -> str | None:
  """The directory holding the six unpacked batches, if any."""
  for candidate in (os.path.join(directory, BATCHES_DIR), directory):
    if all(os.path.isfile(os.path.join(candidate, b)) for b in _ALL_BATCHES):
      return candidate
  return None


def _read_batch_files(directory: str) -> dict[str, tuple[str, bytes]]:
  """Returns `{batch name: (where it came from, pickle bytes)}`."""
  batches_dir = _batches_dir(directory)
  if batches_dir is not None:
    out = {}
    for name in _ALL_BATCHES:
      path = os.path.join(batches_dir, name)
      with open(path, "rb") as f:
        out[name] = (path, f.read())
    return out
  archive = os.path.join(directory, ARCHIVE)
  out = {}
  try:
    with tarfile.open(archive, "r:gz") as tar:
      for member in tar:
        name = os.path.basename(member.name)
        if member.isfile() and name in _ALL_BATCHES:
          out[name] = (f"{archive}:{member.name}",
                       tar.extractfile(member).read())
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise errors.CorruptDataError(
        f"{archive} cannot be read ({e}); download it again from {URL}") from e
  missing = [b for b in _ALL_BATCHES if b not in out]
  if missing:
    raise errors.CorruptDataError(
        f"{archive} lacks {', '.join(missing)}; download it again from {URL}")
  return out


def _parse_batch(where: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images uint8 [N, 32, 32, 3], labels int64 [N])` of one batch."""
  try:
    batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    images = np.asarray(batch[b"data"], np.uint8)
    labels = np.asarray(batch[b"labels"], np.int64)
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError,
          ValueError) as e:
    raise errors.CorruptDataError(
        f"{where} is not a CIFAR-10 batch ({e!r}); download the archive again "
        f"from {URL}") from e
  if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
    raise errors.CorruptDataError(
        f"{where} holds data of shape {images.shape}; expected [N, 3072]")
  if labels.shape != (len(images),) or (len(labels) and (
      labels.min() < 0 or labels.max() >= 10)):
    values = f"{labels.min()}..{labels.max()}" if len(labels) else "-"
    raise errors.CorruptDataError(
        f"{where} holds labels of shape {labels.shape} in {values}; expected "
        f"{len(images)} labels in 0..9")
  # Rows are channel-major: 1024 red, 1024 green, then 1024 blue values.
  return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_splits(directory: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Returns `{split: (images uint8 [N, 32, 32, 3], labels int64 [N])}`."""
  files = _read_batch_files(directory)
  out = {}
  for split, names in SPLITS.items():
    parts = [_parse_batch(*files[name]) for name in names]
    out[split] = (np.concatenate([p[0] for p in parts]),
                  np.concatenate([p[1] for p in parts]))
  return out


class Cifar10Builder(builders.Builder, skip_registration=True):
  """CIFAR-10 from `cifar-10-python.tar.gz` (or its unpacked directory)."""

  name = "haqjax_cifar10"
  DATASET = "cifar10"
  SOURCE_FILES = f"{ARCHIVE} (or {BATCHES_DIR}/)"
  HOW_TO_GET = (f"download it with `wget -P DIR {URL}` and pass "
                "--manual_dir=DIR")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"manual_dir holds {SOURCE_FILES}; {HOW_TO_GET}.")
  TFDS_NAME = "cifar10"
  HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
  CITATION = """@techreport{krizhevsky2009learning,
  title={Learning Multiple Layers of Features from Tiny Images},
  author={Krizhevsky, Alex},
  institution={University of Toronto},
  year={2009}}"""

  @classmethod
  def has_source_files(cls, directory: str) -> bool:
    return (_batches_dir(directory) is not None
            or os.path.isfile(os.path.join(directory, ARCHIVE)))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    arrays = read_splits(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(*arrays[split]) for split in SPLITS}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
