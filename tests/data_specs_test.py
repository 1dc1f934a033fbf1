"""Tests of haqjax.data.specs."""

import dataclasses

import pytest

from haqjax import data
from haqjax.data import specs


def test_datasets_are_sorted_names_with_specs():
  assert data.DATASETS == ("cifar10", "digits", "fashion_mnist", "imagenet2012")
  for name in data.DATASETS:
    spec = data.get_spec(name)
    assert spec.name == name
    assert len(spec.class_names) == spec.num_classes
    assert len(spec.mean) == len(spec.std) == spec.image_shape[-1]


@pytest.mark.parametrize("name, shape, classes", [
    ("digits", (8, 8, 1), 10),
    ("fashion_mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("imagenet2012", (224, 224, 3), 1000),
])
def test_shapes_and_classes(name, shape, classes):
  spec = data.get_spec(name)
  assert spec.image_shape == shape
  assert spec.num_classes == classes


def test_imagenet_classes_are_sorted_synsets():
  names = data.get_spec("imagenet2012").class_names
  assert names[0] == "n01440764"
  assert list(names) == sorted(names)
  assert not data.get_spec("imagenet2012").in_memory


@pytest.mark.parametrize("name", ["foo", "CIFAR10", "", None, 3])
def test_unknown_dataset(name):
  with pytest.raises(ValueError) as e:
    data.get_spec(name)
  assert str(e.value) == (
      f"dataset {name!r} is unknown; allowed: cifar10, digits, fashion_mnist, "
      "imagenet2012")


def test_spec_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    data.get_spec("digits").num_classes = 3


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 1, "num_classes is 1"),
    ("image_shape", (8, 8), "image_shape is (8, 8)"),
    ("mean", (0.1, 0.2), "mean has 2 entries"),
    ("std", (0.0,), "std is (0.0,)"),
    ("class_names", ("a",), "class_names has 1 entries"),
    ("augmentation", "mixup", "augmentation is 'mixup'"),
])
def test_spec_validates_itself(field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(
      ")", r"\)")):
    dataclasses.replace(data.get_spec("digits"), **{field: value})


def test_tfds_package_file_missing_names_places():
  with pytest.raises(data.DataNotFoundError, match="no/such/file.txt"):
    specs.tfds_package_file("no/such/file.txt")
