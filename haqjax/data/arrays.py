"""The user's own data as a haqjax `Split`: numpy arrays or an iterable of batches.

Everything in haqjax that reads data (the trainer's steps and `Evaluator`,
`haqjax.nn.calibrate`, the searches' scorers, `haqjax.api`) reads a
`Split` through `haqjax.data.batches`. `from_arrays` makes one from
`(images, labels)` numpy arrays, `as_split` from whatever the user has::

    train = haqjax.data.from_arrays(x_train, y_train)            # numpy arrays
    val = haqjax.data.as_split((x_val, y_val), name="val")
    test = haqjax.data.as_split(my_batches, name="test")       # (x, y) batches
    for batch in haqjax.data.batches(train, batch_size=128, shuffle=True,
                                     drop_remainder=True):
      ...  # batch["image"] float32, batch["label"] int32, batch["mask"]

Pixel values. The model must see what it was trained on, so:

* float images (any float dtype) reach the model as they are, cast to
  float32: the user's own preprocessing, which their weights were trained
  on, is kept bit for bit;
* uint8 images are normalised as the built-in datasets are,
  `(x / 255 - mean) / std` per channel, with `mean` 0 and `std` 1 unless
  given (so values in [0, 1]); pass a built-in dataset's statistics
  (`haqjax.data.get_spec("fashion_mnist").mean`, `.std`) to feed a model
  trained by haqjax on that dataset.

Images are `[N, H, W, C]`; labels are integers `[N]` in `0..num_classes-1`.
An iterable of batches is read once into memory (a finite one: a list, a
generator, a `tf.data` dataset's numpy iterator). A tfds split from
`haqjax.data.load` stays one option: `as_split` returns a `Split` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from haqjax.data import specs
from haqjax.data import transforms
from haqjax.data.splits import Split

# The name a user dataset's spec carries.
DATASET_NAME = "arrays"
SPLIT_NAMES = ("train", "val", "test")
# `DatasetSpec.std` that makes `transforms.normalize` the identity on float
# images: its scale `1 / (255 * std)` rounds to exactly 1.0 in float32.
_PASS_THROUGH_STD = 1.0 / 255.0


class NumpySource:
  """A `Source` over images and labels held in memory, uint8 or float.

  Attributes:
    images: uint8 or float32 `[N, H, W, C]`, read-only.
    labels: int32 `[N]`, read-only.
    augmentation: what `augment=True` does (`specs.AUGMENT_*`).
  """

  in_memory = True

  def __init__(self, images: np.ndarray, labels: np.ndarray,
               augmentation: str = specs.AUGMENT_NONE):
    if augmentation not in (specs.AUGMENT_NONE, specs.AUGMENT_PAD_CROP_FLIP):
      raise ValueError(f"augmentation is {augmentation!r}; allowed: "
                       f"{specs.AUGMENT_NONE}, {specs.AUGMENT_PAD_CROP_FLIP}")
    self.images = images
    self.labels = labels
    self.images.setflags(write=False)
    self.labels.setflags(write=False)
    self.augmentation = augmentation

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, rows: np.ndarray, *, augment: bool, seed: int, epoch: int
           ) -> tuple[np.ndarray, np.ndarray]:
    images = self.images[rows]
    if augment and self.augmentation == specs.AUGMENT_PAD_CROP_FLIP:
      offsets, flips = transforms.pad_crop_flip_params(seed, epoch, rows, len(self))
      images = transforms.pad_crop_flip(images, offsets, flips)
    return images, self.labels[rows]


def _check_images(images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or not len(images):
    hint = " (add a channel axis: images[..., None])" if images.ndim == 3 else ""
    raise ValueError(f"images has shape {images.shape}; allowed: [N, H, W, C] "
                     f"with N >= 1{hint}")
  if images.dtype == np.uint8:
    return np.array(images)  # A copy: the source makes it read-only.
  if np.issubdtype(images.dtype, np.floating):
    return np.array(images, np.float32)
  raise ValueError(f"images has dtype {images.dtype}; allowed: uint8 (normalised "
                   "as the built-in datasets) or a float dtype (used as given)")


def _check_labels(labels: Any, n: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"labels has shape {labels.shape}; allowed: ({n},), one "
                     "integer per image")
  if not np.issubdtype(labels.dtype, np.integer):
    if not (np.issubdtype(labels.dtype, np.floating)
            and np.array_equal(labels, np.round(labels))):
      raise ValueError(f"labels has dtype {labels.dtype}; allowed: integer class ids")
  if labels.min() < 0:
    raise ValueError(f"labels has {int(labels.min())}; allowed: class ids >= 0")
  return np.array(labels, np.int32)


def _stats(field: str, value: float | Sequence[float] | None, default: float,
           channels: int) -> tuple[float, ...]:
  if value is None:
    return (default,) * channels
  values = tuple(float(v) for v in np.atleast_1d(np.asarray(value, np.float64)))
  if len(values) == 1:
    values *= channels
  if len(values) != channels:
    raise ValueError(f"{field} has {len(values)} values; allowed: 1 or one per "
                     f"channel ({channels})")
  return values


def from_arrays(images: Any, labels: Any, *, name: str = "train",
                num_classes: int | None = None,
                mean: float | Sequence[float] | None = None,
                std: float | Sequence[float] | None = None,
                augmentation: str = specs.AUGMENT_NONE) -> Split:
  """`(images, labels)` numpy arrays as a haqjax `Split`.

  Args:
    images: `[N, H, W, C]`, uint8 (normalised `(x / 255 - mean) / std`) or
      float (fed to the model as given, cast to float32).
    labels: integer class ids `[N]`.
    name: the split's name: 'train', 'val' or 'test'.
    num_classes: the number of classes; default `max(labels) + 1` (at least 2).
    mean: per-channel mean of uint8 pixels scaled to [0, 1] (one value or one
      per channel); default 0. Not allowed with float images.
    std: per-channel standard deviation, likewise; default 1.
    augmentation: what `augment=True` in `batches` does: 'none', or
      'pad_crop_flip' (4-pixel padding, random crop, horizontal flip).

  Returns:
    A `Split` over a copy of the arrays (the caller's arrays are not frozen).

  Raises:
    ValueError: for arrays of the wrong shape or dtype, labels outside
      `0..num_classes-1`, or mean/std with float images.
  """
  if name not in SPLIT_NAMES:
    raise ValueError(f"name is {name!r}; allowed: {', '.join(SPLIT_NAMES)}")
  images = _check_images(images)
  labels = _check_labels(labels, len(images))
  classes = max(2, int(labels.max()) + 1) if num_classes is None else num_classes
  if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 2:
    raise ValueError(f"num_classes is {num_classes!r}; allowed: an int >= 2")
  if labels.max() >= classes:
    raise ValueError(f"labels has {int(labels.max())}; allowed: 0..{classes - 1} "
                     f"(num_classes={classes})")
  channels = images.shape[-1]
  if images.dtype == np.uint8:
    mean_values = _stats("mean", mean, 0.0, channels)
    std_values = _stats("std", std, 1.0, channels)
  elif mean is not None or std is not None:
    raise ValueError(f"mean={mean!r}, std={std!r} with {images.dtype} images; allowed: "
                     "None (float images are used as given; normalise them yourself)")
  else:
    mean_values, std_values = (0.0,) * channels, (_PASS_THROUGH_STD,) * channels
  spec = specs.DatasetSpec(
      name=DATASET_NAME, num_classes=int(classes), image_shape=tuple(images.shape[1:]),
      mean=mean_values, std=std_values,
      class_names=tuple(str(i) for i in range(int(classes))), default_val_size=0,
      augmentation=augmentation)
  rows = np.arange(len(images))
  rows.setflags(write=False)
  return Split(name, spec, NumpySource(images, labels, augmentation), rows)


def _batch_arrays(batch: Any, index: int) -> tuple[Any, Any]:
  if isinstance(batch, dict):
    if "image" not in batch or "label" not in batch:
      raise ValueError(f"batch {index} has keys {sorted(batch)}; allowed: a dict with "
                       "'image' and 'label', or an (images, labels) pair")
    return batch["image"], batch["label"]
  if isinstance(batch, (tuple, list)) and len(batch) == 2:
    return batch[0], batch[1]
  raise ValueError(f"batch {index} is a {type(batch).__name__}; allowed: an (images, "
                   "labels) pair or a dict with 'image' and 'label'")


def _is_pair(data: Any) -> bool:
  """Whether `data` is one `(images, labels)` pair of arrays (not two batches)."""
  return (isinstance(data, (tuple, list)) and len(data) == 2
          and all(hasattr(x, "shape") for x in data) and np.ndim(data[1]) == 1)


def as_split(data: Any, *, name: str = "train", num_classes: int | None = None,
             **kwargs: Any) -> Split:
  """The user's data as a `Split`, whatever form it comes in.

  Args:
    data: a `Split` (returned unchanged), an `(images, labels)` pair of
      arrays, a dict with 'image' and 'label', or a finite iterable of such
      batches (read once into memory and concatenated).
    name: the split's name ('train', 'val' or 'test').
    num_classes: see `from_arrays`.
    **kwargs: `from_arrays`' mean, std and augmentation.

  Returns:
    The `Split`.

  Raises:
    ValueError: for data of none of these forms, or as `from_arrays`.
  """
  if isinstance(data, Split):
    return data
  if isinstance(data, dict) or _is_pair(data):
    images, labels = _batch_arrays(data, 0)
    return from_arrays(images, labels, name=name, num_classes=num_classes, **kwargs)
  if not isinstance(data, Iterable) or isinstance(data, (str, bytes, np.ndarray)):
    raise ValueError(f"data is a {type(data).__name__}; allowed: a haqjax Split, an "
                     "(images, labels) pair of arrays or an iterable of such batches")
  images, labels = [], []
  for i, batch in enumerate(data):
    x, y = _batch_arrays(batch, i)
    images.append(np.asarray(x))
    labels.append(np.asarray(y).reshape(-1))
  if not images:
    raise ValueError("data is an empty iterable; allowed: at least one batch")
  return from_arrays(np.concatenate(images), np.concatenate(labels), name=name,
                     num_classes=num_classes, **kwargs)
