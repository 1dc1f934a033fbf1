"""Prepares a dataset once into array_record shards, then finds it again.

`prepare(name)` returns a dataset ready for random access, in this order:

1. haqjax's own prepared copy in `data_dir` (`<data_dir>/haqjax_<name>/1.0.0`);
2. tfds's own prepared copy (`cifar10`, `fashion_mnist`, `imagenet2012`), if
   it was written in array_record format, in `data_dir` or in tfds's data dir
   (`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`);
3. otherwise it prepares haqjax's copy from the source files, looked for in
   `manual_dir` and then in the dataset's standard places, or raises one
   `DataNotFoundError` line naming every place and how to get the files.

Preparing writes into a tfds `incomplete.*` directory that is renamed into
place only when complete, so an interrupted run leaves nothing that is read
later; concurrent preparers on one machine wait on a lock file, and the one
that gets it second finds the data ready. Nothing is ever downloaded.

`data_dir` defaults to `$HAQJAX_DATA_DIR`, else `~/.cache/haqjax/datasets`.
From the command line::

    python -m haqjax.data imagenet2012 --manual_dir=/data/imagenet
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import os
import re
import shutil
from collections.abc import Iterator

from absl import logging
import tensorflow_datasets as tfds

from haqjax.data import builders
from haqjax.data import cifar10
from haqjax.data import digits
from haqjax.data import errors
from haqjax.data import fashion_mnist
from haqjax.data import imagenet
from haqjax.data import specs

DATA_DIR_ENV = "HAQJAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/haqjax/datasets"
TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"
TFDS_DEFAULT_DATA_DIR = "~/tensorflow_datasets"

BUILDERS: dict[str, type[builders.Builder]] = {
    "cifar10": cifar10.Cifar10Builder,
    "digits": digits.DigitsBuilder,
    "fashion_mnist": fashion_mnist.FashionMnistBuilder,
    "imagenet2012": imagenet.Imagenet2012Builder,
}


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """A prepared dataset: a tfds builder whose array_record files exist.

  Attributes:
    name: the haqjax dataset name.
    builder: the tfds builder to read from (haqjax's, or tfds's own from its
      directory).
    train_split: the name of its training split.
    test_split: the name of its test (or validation) split.
  """
  name: str
  builder: tfds.core.DatasetBuilder
  train_split: str
  test_split: str

  @property
  def path(self) -> str:
    """The directory holding the array_record files."""
    return os.fspath(self.builder.data_path)


def default_data_dir() -> str:
  """`$HAQJAX_DATA_DIR`, else `~/.cache/haqjax/datasets`, absolute."""
  return _absolute(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def _absolute(path: str | os.PathLike) -> str:
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _join_places(places: list[str]) -> str:
  places = list(dict.fromkeys(places))  # Unique, in order.
  return places[0] if len(places) == 1 else (
      ", ".join(places[:-1]) + " or " + places[-1])


def _version_key(name: str) -> tuple[int, ...]:
  return tuple(int(part) for part in name.split("."))


def _find_tfds_copy(cls: type[builders.Builder], roots: list[str]
                    ) -> tfds.core.DatasetBuilder | None:
  """tfds's own prepared copy of the dataset in array_record format, if any."""
  for root in roots:
    base = os.path.join(root, cls.TFDS_NAME)
    if not os.path.isdir(base):
      continue
    versions = sorted((v for v in os.listdir(base)
                       if re.fullmatch(r"\d+\.\d+\.\d+", v)),
                      key=_version_key, reverse=True)
    for version in versions:
      path = os.path.join(base, version)
      if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        continue
      try:
        builder = tfds.builder_from_directory(path)
      except Exception as e:  # pylint: disable=broad-except
        # A foreign directory we merely hoped to reuse; fall back to ours.
        logging.warning("not reusing %s: %r", path, e)
        continue
      splits = builder.info.splits
      if (builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
          and "train" in splits and cls.TFDS_TEST_SPLIT in splits):
        return builder
  return None


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # tfds warns about missing folders; the usual case here before preparing.
  return builder.data_path.exists() and builder.is_prepared()


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  """Holds an exclusive `flock` on `path` (created if needed)."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, *, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None) -> PreparedDataset:
  """Returns dataset `name` ready to read, preparing it first if needed.

  Args:
    name: one of `haqjax.data.DATASETS`.
    data_dir: where prepared datasets live; default `default_data_dir()`.
    manual_dir: a directory holding the dataset's source files; searched
      before the dataset's standard places. Not needed for `digits`.

  Returns:
    The prepared dataset.

  Raises:
    ValueError: if `name` is unknown.
    DataNotFoundError: if the dataset is not prepared and its source files are
      nowhere to be found.
    CorruptDataError: if a source file cannot be parsed.
  """
  specs.get_spec(name)  # Validates the name.
  cls = BUILDERS[name]
  data_dir = _absolute(data_dir) if data_dir else default_data_dir()
  builder = cls(data_dir=data_dir, file_format="array_record")
  if _is_prepared(builder):
    return PreparedDataset(name, builder, "train", cls.TEST_SPLIT)

  tfds_roots = [data_dir, _absolute(os.environ.get(TFDS_DATA_DIR_ENV)
                                    or TFDS_DEFAULT_DATA_DIR)]
  if cls.TFDS_NAME:
    tfds_copy = _find_tfds_copy(cls, tfds_roots)
    if tfds_copy is not None:
      logging.info("%s: reading tfds's copy in %s", name, tfds_copy.data_path)
      return PreparedDataset(name, tfds_copy, "train", cls.TFDS_TEST_SPLIT)

  candidates = ([_absolute(manual_dir)] if manual_dir else []) + [
      _absolute(d) for d in cls.source_dirs(data_dir)]
  source_dir = None
  if cls.NEEDS_SOURCE_FILES:
    source_dir = next((d for d in candidates if cls.has_source_files(d)), None)
    if source_dir is None:
      prepared = os.fspath(builder.data_path)
      if cls.TFDS_NAME:
        prepared += (f", nor as tfds's {cls.TFDS_NAME} (array_record) in "
                     f"{_join_places(tfds_roots)}")
      raise errors.DataNotFoundError(
          f"dataset {name!r}: {cls.SOURCE_FILES} not found in "
          f"{_join_places(candidates)}, and it is not prepared in {prepared}; "
          f"{cls.HOW_TO_GET}")

  os.makedirs(data_dir, exist_ok=True)
  with _file_lock(os.path.join(data_dir, f".{cls.name}.lock")):
    if not _is_prepared(builder):  # Someone else may have finished meanwhile.
      # Holding the lock, any incomplete directory is a dead preparer's.
      for stale in glob.glob(os.path.join(data_dir, cls.name, "incomplete.*")):
        logging.info("removing %s, left by an interrupted prepare", stale)
        shutil.rmtree(stale, ignore_errors=True)
      logging.info("preparing %s from %s into %s", name,
                   source_dir or "bundled data", builder.data_path)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              manual_dir=source_dir, try_download_gcs=False))
      builder = cls(data_dir=data_dir, file_format="array_record")
  return PreparedDataset(name, builder, "train", cls.TEST_SPLIT)
