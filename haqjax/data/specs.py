"""What each dataset looks like to a model: shapes, classes, normalisation.

A `DatasetSpec` is static metadata. It does not touch any file except, for
ImageNet, the list of the 1,000 synset ids that ships inside
`tensorflow_datasets`::

    spec = get_spec("cifar10")
    spec.image_shape   # (32, 32, 3)
    spec.num_classes   # 10

Pixel values are normalised per channel as `(x / 255 - mean) / std`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib

from haqjax.data import errors

DATASETS = ("cifar10", "digits", "fashion_mnist", "imagenet2012")

# What `augment=True` does for each dataset (see `haqjax.data.transforms`).
AUGMENT_NONE = "none"
AUGMENT_PAD_CROP_FLIP = "pad_crop_flip"
AUGMENT_RANDOM_RESIZED_CROP_FLIP = "random_resized_crop_flip"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec:
  """Static description of a dataset as the model sees it.

  Attributes:
    name: the dataset's name, one of `DATASETS`.
    num_classes: number of classes; labels are `0..num_classes - 1`.
    image_shape: `(H, W, C)` of one image after preprocessing, as fed to the
      model.
    mean: per-channel mean of pixel values scaled to `[0, 1]`.
    std: per-channel standard deviation of pixel values scaled to `[0, 1]`.
    class_names: one name per label, in label order.
    default_val_size: number of training examples `load` holds out as the
      validation split when no `val_size` is given.
    augmentation: what `augment=True` does in `batches`: `"none"`,
      `"pad_crop_flip"` (4-pixel zero padding, random crop, horizontal flip)
      or `"random_resized_crop_flip"` (Inception-style crop, horizontal flip).
    in_memory: whether the whole dataset is decoded into memory once per
      process (small datasets) or streamed and decoded batch by batch.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...]
  default_val_size: int
  augmentation: str = AUGMENT_NONE
  in_memory: bool = True

  def __post_init__(self):
    if self.num_classes < 2:
      raise ValueError(f"num_classes is {self.num_classes}; allowed: >= 2")
    if len(self.image_shape) != 3 or min(self.image_shape) < 1:
      raise ValueError(f"image_shape is {self.image_shape}; allowed: (H, W, C) "
                       "with positive sizes")
    channels = self.image_shape[-1]
    for field in ("mean", "std"):
      if len(getattr(self, field)) != channels:
        raise ValueError(f"{field} has {len(getattr(self, field))} entries; "
                         f"allowed: one per channel ({channels})")
    if min(self.std) <= 0:
      raise ValueError(f"std is {self.std}; allowed: positive values")
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"class_names has {len(self.class_names)} entries; "
                       f"allowed: num_classes ({self.num_classes})")
    allowed = (AUGMENT_NONE, AUGMENT_PAD_CROP_FLIP,
               AUGMENT_RANDOM_RESIZED_CROP_FLIP)
    if self.augmentation not in allowed:
      raise ValueError(f"augmentation is {self.augmentation!r}; allowed: "
                       f"{', '.join(allowed)}")


def tfds_package_file(*relative_paths: str) -> pathlib.Path:
  """Returns the first of `relative_paths` that exists in `tensorflow_datasets`.

  The package is located without importing it. Different tfds releases keep
  their metadata files in different folders, hence several candidates.

  Raises:
    DataNotFoundError: if none of the files exists.
  """
  spec = importlib.util.find_spec("tensorflow_datasets")
  roots = list(spec.submodule_search_locations or ()) if spec else []
  for root in roots:
    for relative in relative_paths:
      path = pathlib.Path(root, relative)
      if path.is_file():
        return path
  places = ", ".join(os.path.join(r, p) for r in roots for p in relative_paths)
  raise errors.DataNotFoundError(
      "tensorflow_datasets metadata file not found in "
      f"{places or '(tensorflow_datasets is not installed)'}; reinstall it "
      "with `pip install --force-reinstall tensorflow-datasets`")


def imagenet_synsets() -> tuple[str, ...]:
  """The 1,000 ImageNet synset ids in label order (sorted), from tfds."""
  return _imagenet_synsets()


@functools.cache
def _imagenet_synsets() -> tuple[str, ...]:
  path = tfds_package_file("datasets/imagenet2012/labels.txt",
                           "image_classification/imagenet2012_labels.txt")
  synsets = tuple(path.read_text().split())
  if len(synsets) != 1000 or list(synsets) != sorted(synsets):
    raise errors.CorruptDataError(
        f"{path} holds {len(synsets)} synset ids; expected 1000, sorted")
  return synsets


_FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                    "frog", "horse", "ship", "truck")


def _digits() -> DatasetSpec:
  # mean/std measured on all 1,797 images after scaling 0..16 to 0..255.
  return DatasetSpec(name="digits", num_classes=10, image_shape=(8, 8, 1),
                     mean=(0.3053,), std=(0.3759,),
                     class_names=tuple(str(d) for d in range(10)),
                     default_val_size=144)


def _fashion_mnist() -> DatasetSpec:
  # mean/std measured on the 60,000 training images.
  return DatasetSpec(name="fashion_mnist", num_classes=10,
                     image_shape=(28, 28, 1), mean=(0.2860,), std=(0.3530,),
                     class_names=_FASHION_MNIST_CLASSES, default_val_size=5000)


def _cifar10() -> DatasetSpec:
  # mean/std measured on the 50,000 training images.
  return DatasetSpec(name="cifar10", num_classes=10, image_shape=(32, 32, 3),
                     mean=(0.4914, 0.4822, 0.4465),
                     std=(0.2470, 0.2435, 0.2616),
                     class_names=_CIFAR10_CLASSES, default_val_size=5000,
                     augmentation=AUGMENT_PAD_CROP_FLIP)


def _imagenet2012() -> DatasetSpec:
  # The usual ImageNet statistics (torchvision, timm, flax examples).
  return DatasetSpec(name="imagenet2012", num_classes=1000,
                     image_shape=(224, 224, 3), mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225), class_names=imagenet_synsets(),
                     default_val_size=10000,
                     augmentation=AUGMENT_RANDOM_RESIZED_CROP_FLIP,
                     in_memory=False)


_FACTORIES = {"cifar10": _cifar10, "digits": _digits,
              "fashion_mnist": _fashion_mnist, "imagenet2012": _imagenet2012}


def get_spec(name: str) -> DatasetSpec:
  """Returns the spec of dataset `name`.

  Args:
    name: one of `DATASETS`.

  Returns:
    The dataset's `DatasetSpec`.

  Raises:
    ValueError: if `name` is not a known dataset.
  """
  if not isinstance(name, str) or name not in _FACTORIES:
    raise ValueError(f"dataset {name!r} is unknown; allowed: "
                     f"{', '.join(DATASETS)}")
  return _cached_spec(name)


@functools.cache
def _cached_spec(name: str) -> DatasetSpec:
  return _FACTORIES[name]()
