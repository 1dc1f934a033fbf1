"""Train, validation and test splits of a prepared dataset.

`load` prepares a dataset if needed and returns its three splits::

    splits = load("cifar10", val_size=5000, split_seed=0)
    len(splits.train), len(splits.val), len(splits.test)  # 45000 5000 10000

`val` is held out of the dataset's training set: it is the split a bit-width
search scores its candidate policies on (HAQ, Wang et al. 2019), never the
test set. Which examples it holds depends on `split_seed` only, so every
training seed, search and fine-tuning run sees the same validation split.
`test` is the dataset's own test set (ImageNet: its validation set).

Small datasets (digits, Fashion-MNIST, CIFAR-10) are decoded into uint8 numpy
arrays once per process and cached; ImageNet is streamed from its array_record
files and decoded in a thread pool. Either way a split hands out uint8 images
of `spec.image_shape` (`Split.load`); `haqjax.data.batches` turns them into
normalised batches.

References:
  Wang, Liu, Lin, Lin & Han, "HAQ: Hardware-Aware Automated Quantization with
  Mixed Precision", CVPR 2019.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import numbers
import os
import threading
from typing import NamedTuple, Protocol

import numpy as np
import PIL
import tensorflow_datasets as tfds

from haqjax.data import errors
from haqjax.data import preparation
from haqjax.data import specs
from haqjax.data import transforms

VAL_TAG = 4  # First word of the seed sequence that draws the validation split.
_READ_CHUNK = 8192  # Examples per data-source call when reading into memory.


class Source(Protocol):
  """Examples by index: what a `Split` reads from."""

  in_memory: bool

  def __len__(self) -> int:
    ...

  def read(self, rows: np.ndarray, *, augment: bool, seed: int, epoch: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Returns uint8 images `[B, H, W, C]` and int32 labels `[B]` of `rows`."""
    ...


class ArraySource:
  """A whole split decoded into memory.

  Attributes:
    images: uint8 `[N, H, W, C]`, read-only.
    labels: int32 `[N]`, read-only.
    augmentation: what `augment=True` does (`specs.AUGMENT_*`).
  """

  in_memory = True

  def __init__(self, images: np.ndarray, labels: np.ndarray,
               augmentation: str = specs.AUGMENT_NONE):
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"images is {images.dtype} {images.shape}; allowed: "
                       "uint8 [N, H, W, C]")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"labels has shape {labels.shape}; allowed: "
                       f"({len(images)},), one per image")
    if augmentation not in (specs.AUGMENT_NONE, specs.AUGMENT_PAD_CROP_FLIP):
      raise ValueError(f"augmentation is {augmentation!r}; allowed for "
                       f"in-memory data: {specs.AUGMENT_NONE}, "
                       f"{specs.AUGMENT_PAD_CROP_FLIP}")
    self.images = images
    self.labels = labels.astype(np.int32)
    self.images.setflags(write=False)
    self.labels.setflags(write=False)
    self.augmentation = augmentation

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, rows: np.ndarray, *, augment: bool, seed: int, epoch: int
           ) -> tuple[np.ndarray, np.ndarray]:
    images = self.images[rows]
    if augment and self.augmentation == specs.AUGMENT_PAD_CROP_FLIP:
      offsets, flips = transforms.pad_crop_flip_params(seed, epoch, rows,
                                                       len(self))
      images = transforms.pad_crop_flip(images, offsets, flips)
    return images, self.labels[rows]


class RecordSource:
  """Encoded images read from array_record files and decoded in threads.

  With `augment` each image gets `transforms.random_resized_crop` (random per
  `(seed, epoch, row)`), else `transforms.center_crop`.
  """

  in_memory = False

  def __init__(self, data_source, image_size: int, num_workers: int | None,
               description: str):
    self._data_source = data_source
    self._size = image_size
    self._num_workers = num_workers or min(32, os.cpu_count() or 1)
    self._description = description
    self._pool = None
    self._pool_lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._data_source)

  def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._pool_lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._num_workers, thread_name_prefix="haqjax-decode")
      return self._pool

  def _preprocess(self, row: int, data: bytes, augment: bool, seed: int,
                  epoch: int) -> np.ndarray:
    try:
      image = transforms.decode_rgb(data)
    except (PIL.UnidentifiedImageError, OSError) as e:
      raise errors.CorruptDataError(
          f"{self._description} example {row} cannot be decoded ({e}); "
          "prepare the dataset again") from e
    if augment:
      return transforms.random_resized_crop(
          image, transforms.example_rng(seed, epoch, row), self._size)
    return transforms.center_crop(image, self._size)

  def read(self, rows: np.ndarray, *, augment: bool, seed: int, epoch: int
           ) -> tuple[np.ndarray, np.ndarray]:
    rows = [int(r) for r in rows]
    if not rows:
      return (np.zeros((0, self._size, self._size, 3), np.uint8),
              np.zeros((0,), np.int32))
    records = self._data_source.__getitems__(rows)
    labels = np.array([r["label"] for r in records], np.int32)
    images = self._executor().map(
        functools.partial(self._preprocess, augment=augment, seed=seed,
                          epoch=epoch),
        rows, [r["image"] for r in records])
    return np.stack(list(images)), labels


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Some examples of a dataset, in a fixed order.

  Attributes:
    name: `"train"`, `"val"` or `"test"`.
    spec: the dataset's spec.
    source: where the examples come from.
    rows: int64 `[N]`, the indices in `source` of this split's examples.
  """
  name: str
  spec: specs.DatasetSpec
  source: Source
  rows: np.ndarray

  def __len__(self) -> int:
    return len(self.rows)

  def __repr__(self) -> str:
    return (f"Split(name={self.name!r}, dataset={self.spec.name!r}, "
            f"size={len(self)})")

  @property
  def in_memory(self) -> bool:
    """Whether reading is a memory copy (else it decodes files)."""
    return self.source.in_memory

  def load(self, positions: np.ndarray, *, augment: bool = False,
           seed: int = 0, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reads examples `positions` (indices into this split).

    Args:
      positions: int `[B]`, in `0..len(self) - 1`.
      augment: whether to apply the dataset's training augmentation.
      seed: data seed of the augmentation.
      epoch: epoch of the augmentation.

    Returns:
      uint8 images `[B, H, W, C]` (`spec.image_shape`) and int32 labels `[B]`.
    """
    positions = np.asarray(positions, np.int64)
    return self.source.read(self.rows[positions], augment=augment, seed=seed,
                            epoch=epoch)


class Splits(NamedTuple):
  """The three splits of a dataset, and its spec."""
  train: Split
  val: Split
  test: Split
  spec: specs.DatasetSpec


_SOURCES: dict[tuple[str, str, int | None], Source] = {}
_SOURCES_LOCK = threading.Lock()


def _read_into_memory(prepared: preparation.PreparedDataset, split: str,
                      spec: specs.DatasetSpec) -> ArraySource:
  data_source = prepared.builder.as_data_source(split)
  n = len(data_source)
  images = np.empty((n,) + spec.image_shape, np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _READ_CHUNK):
    records = data_source.__getitems__(
        list(range(start, min(n, start + _READ_CHUNK))))
    for i, record in enumerate(records, start=start):
      image = np.asarray(record["image"])
      if image.shape != spec.image_shape:
        raise errors.CorruptDataError(
            f"{prepared.path} {split} example {i} has shape {image.shape}; "
            f"expected {spec.image_shape}; prepare the dataset again")
      images[i] = image
      labels[i] = record["label"]
  return ArraySource(images, labels, spec.augmentation)


def _source(prepared: preparation.PreparedDataset, split: str,
            spec: specs.DatasetSpec, num_workers: int | None) -> Source:
  """The (per-process cached) source of one split of a prepared dataset."""
  key = (prepared.path, split, None if spec.in_memory else num_workers)
  with _SOURCES_LOCK:
    if key not in _SOURCES:
      if spec.in_memory:
        _SOURCES[key] = _read_into_memory(prepared, split, spec)
      else:
        data_source = prepared.builder.as_data_source(
            split, decoders={"image": tfds.decode.SkipDecoding()})
        _SOURCES[key] = RecordSource(
            data_source, spec.image_shape[0], num_workers,
            f"{prepared.path} {split}")
    return _SOURCES[key]


def clear_cache() -> None:
  """Forgets the in-memory copies of datasets held by this process."""
  with _SOURCES_LOCK:
    _SOURCES.clear()


def _val_count(val_size: int | float | None, num_train: int,
               spec: specs.DatasetSpec) -> int:
  """The number of held-out examples `val_size` means."""
  what = "val_size"
  if val_size is None:
    val_size = spec.default_val_size
    what = f"val_size (default for {spec.name})"
  allowed = (f"allowed: a count in 0..{num_train - 1} or a fraction in (0, 1) "
             f"(the {spec.name} training set has {num_train} examples)")
  if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
    raise ValueError(f"{what} is {val_size!r}; {allowed}")
  if 0.0 < val_size < 1.0:  # A fraction.
    count = max(1, round(float(val_size) * num_train))
  elif float(val_size).is_integer():  # A count, possibly typed as a float.
    count = int(val_size)
  else:
    raise ValueError(f"{what} is {val_size!r}; {allowed}")
  if not 0 <= count < num_train:
    raise ValueError(f"{what} is {val_size!r}; {allowed}")
  return count


def load(name: str, *, data_dir: str | os.PathLike | None = None,
         manual_dir: str | os.PathLike | None = None,
         val_size: int | float | None = None, split_seed: int = 0,
         num_workers: int | None = None) -> Splits:
  """Loads dataset `name` as train / val / test splits, preparing it if needed.

  Args:
    name: one of `haqjax.data.DATASETS`.
    data_dir: where prepared datasets live; default `$HAQJAX_DATA_DIR`, else
      `~/.cache/haqjax/datasets`.
    manual_dir: a directory holding the dataset's source files, searched
      before its standard places (see `haqjax.data.preparation`).
    val_size: examples held out of the training set as the validation split:
      a fraction in (0, 1), else a count (an int, or a whole float such as
      5000.0); 0 for an empty validation split. Default:
      `spec.default_val_size`.
    split_seed: seed of the random choice of the validation examples.
    num_workers: decode threads for streamed datasets (ImageNet); default
      `min(32, os.cpu_count())`.

  Returns:
    `Splits(train, val, test, spec)`; `train` and `val` are disjoint and
    together are the dataset's training set.

  Raises:
    ValueError: for an unknown `name`, or `val_size` / `split_seed` out of
      range.
    DataNotFoundError: if the dataset is not prepared and its files are not
      found.
    CorruptDataError: if a source file cannot be parsed.
  """
  spec = specs.get_spec(name)
  if (isinstance(split_seed, bool)
      or not isinstance(split_seed, numbers.Integral) or split_seed < 0):
    raise ValueError(f"split_seed is {split_seed!r}; allowed: an int >= 0")
  if num_workers is not None and (isinstance(num_workers, bool)
                                  or not isinstance(num_workers, int)
                                  or num_workers < 1):
    raise ValueError(f"num_workers is {num_workers!r}; allowed: an int >= 1")
  prepared = preparation.prepare(name, data_dir=data_dir, manual_dir=manual_dir)
  train_source = _source(prepared, prepared.train_split, spec, num_workers)
  test_source = _source(prepared, prepared.test_split, spec, num_workers)

  num_val = _val_count(val_size, len(train_source), spec)
  order = np.random.default_rng([VAL_TAG, int(split_seed)]).permutation(
      len(train_source))
  # Sorted rows: reading in file order is faster, and batches shuffle anyway.
  val_rows = np.sort(order[:num_val])
  train_rows = np.sort(order[num_val:])
  test_rows = np.arange(len(test_source))
  for rows in (val_rows, train_rows, test_rows):
    rows.setflags(write=False)
  return Splits(train=Split("train", spec, train_source, train_rows),
                val=Split("val", spec, train_source, val_rows),
                test=Split("test", spec, test_source, test_rows),
                spec=spec)
