"""Fashion-MNIST from its four idx files, as a tfds builder.

60,000 training and 10,000 test grey 28x28 images of 10 kinds of clothing. The
files are the original idx files, gzipped or not::

    train-images-idx3-ubyte(.gz)  train-labels-idx1-ubyte(.gz)
    t10k-images-idx3-ubyte(.gz)   t10k-labels-idx1-ubyte(.gz)

Debian and Ubuntu ship them in the package `dataset-fashion-mnist`, which
installs them into `/usr/share/datasets/fashion-mnist`.

References:
  Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds

from haqjax.data import builders
from haqjax.data import errors

# split -> (images file, labels file), without the optional ".gz".
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_UBYTE = 0x08  # idx type code of unsigned bytes.


def find_file(directory: str, stem: str) -> str | None:
  """Returns `directory/stem` or `directory/stem.gz`, whichever exists."""
  for name in (stem, stem + ".gz"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def read_idx(path: str, ndim: int) -> np.ndarray:
  """Reads an idx file of unsigned bytes with `ndim` dimensions.

  The idx format is a 4-byte magic number (two zero bytes, a type code, the
  number of dimensions), one big-endian int32 per dimension, then the values.

  Args:
    path: the file, gzipped when its name ends in ".gz".
    ndim: the expected number of dimensions (3 for images, 1 for labels).

  Returns:
    A read-only uint8 array of the shape the header declares.

  Raises:
    CorruptDataError: if the file is not a complete idx file of that kind.
  """
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise errors.CorruptDataError(
        f"{path} is not a readable gzip file ({e}); replace it with a fresh "
        "copy") from e
  header = 4 + 4 * ndim
  magic = bytes([0, 0, _UBYTE, ndim])
  if data[:4] != magic:
    raise errors.CorruptDataError(
        f"{path} has magic number {data[:4].hex() or '(empty)'}; expected "
        f"{magic.hex()} (idx, unsigned bytes, {ndim} dims); replace it with a "
        "fresh copy")
  if len(data) < header:
    raise errors.CorruptDataError(
        f"{path} is truncated inside its header ({len(data)} bytes); replace "
        "it with a fresh copy")
  shape = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, offset=4))
  expected = header + int(np.prod(shape))
  if len(data) != expected:
    raise errors.CorruptDataError(
        f"{path} has {len(data)} bytes; its header {shape} needs {expected} "
        f"({'truncated' if len(data) < expected else 'trailing data'}); "
        "replace it with a fresh copy")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images uint8 [N, 28, 28, 1], labels uint8 [N])` of a split."""
  images_path, labels_path = (find_file(directory, stem)
                              for stem in FILES[split])
  if images_path is None or labels_path is None:
    raise errors.DataNotFoundError(
        f"dataset 'fashion_mnist': {' and '.join(FILES[split])} (or .gz) not "
        f"found in {directory}")
  images = read_idx(images_path, ndim=3)
  labels = read_idx(labels_path, ndim=1)
  if images.shape[1:] != (28, 28):
    raise errors.CorruptDataError(
        f"{images_path} holds images of shape {images.shape[1:]}; expected "
        "(28, 28)")
  if len(images) != len(labels):
    raise errors.CorruptDataError(
        f"{images_path} holds {len(images)} images but {labels_path} holds "
        f"{len(labels)} labels; expected the same number")
  if len(labels) and labels.max() >= 10:
    raise errors.CorruptDataError(
        f"{labels_path} holds label {labels.max()}; expected 0..9")
  return images[..., None], labels


class FashionMnistBuilder(builders.Builder, skip_registration=True):
  """Fashion-MNIST from the idx files in the manual dir."""

  name = "haqjax_fashion_mnist"
  DATASET = "fashion_mnist"
  SOURCE_FILES = "the four idx files (train-images-idx3-ubyte.gz, ...)"
  HOW_TO_GET = ("get them with `apt-get install dataset-fashion-mnist`, or put "
                "the four idx files in a directory and pass --manual_dir=DIR")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"manual_dir holds {SOURCE_FILES}; {HOW_TO_GET}.")
  STANDARD_DIRS = (DEBIAN_DIR,)
  TFDS_NAME = "fashion_mnist"
  HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
  CITATION = """@article{xiao2017fashion,
  title={Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  author={Xiao, Han and Rasul, Kashif and Vollgraf, Roland},
  journal={arXiv preprint arXiv:1708.07747},
  year={2017}}"""

  @classmethod
  def has_source_files(cls, directory: str) -> bool:
    return all(find_file(directory, stem) is not None
               for stems in FILES.values() for stem in stems)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    directory = os.fspath(dl_manager.manual_dir)
    # Parse everything first, so a corrupt file fails before anything is
    # written.
    arrays = {split: read_split(directory, split) for split in FILES}
    return {split: self._generate_examples(*arrays[split]) for split in FILES}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
