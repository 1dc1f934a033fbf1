"""haqjax.data.from_arrays / as_split: the user's arrays and batches as a Split."""

import numpy as np
import pytest

from haqjax import data as haq_data
from haqjax.data import arrays


def _all(split, batch_size=7):
  batches = list(haq_data.batches(split, batch_size=batch_size, shuffle=False,
                                  drop_remainder=False))
  mask = np.concatenate([b["mask"] for b in batches]) > 0
  return (np.concatenate([b["image"] for b in batches])[mask],
          np.concatenate([b["label"] for b in batches])[mask])


def test_float_images_reach_the_model_bit_for_bit():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((20, 5, 4, 3)) * 37.0).astype(np.float32)
  x[0, 0, 0] = [np.finfo(np.float32).tiny, -1e30, 3.0e-7]
  y = rng.integers(0, 4, 20)
  images, labels = _all(haq_data.from_arrays(x, y))
  np.testing.assert_array_equal(images, x)  # Exact, not close.
  np.testing.assert_array_equal(labels, y)


def test_float64_images_are_cast_to_float32():
  x = np.linspace(-2, 2, 2 * 3 * 3).reshape(2, 3, 3, 1)
  images, _ = _all(haq_data.from_arrays(x, np.array([0, 1])))
  np.testing.assert_array_equal(images, x.astype(np.float32))


def test_uint8_images_are_normalised_as_the_builtin_datasets():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (9, 4, 4, 2)).astype(np.uint8)
  y = np.arange(9) % 3
  images, _ = _all(haq_data.from_arrays(x, y))
  np.testing.assert_allclose(images, x / 255.0, rtol=1e-6)
  mean, std = (0.25, 0.5), (0.5, 0.125)
  images, _ = _all(haq_data.from_arrays(x, y, mean=mean, std=std))
  np.testing.assert_allclose(images, (x / 255.0 - np.array(mean)) / np.array(std),
                             rtol=1e-5, atol=1e-6)


def test_the_spec_and_the_split():
  x = np.zeros((6, 2, 2, 1), np.uint8)
  split = haq_data.from_arrays(x, np.array([0, 1, 2, 0, 1, 2]), name="val")
  assert split.name == "val" and len(split) == 6 and split.in_memory
  assert split.spec.num_classes == 3 and split.spec.image_shape == (2, 2, 1)
  assert haq_data.from_arrays(x, np.zeros(6, int)).spec.num_classes == 2
  assert haq_data.from_arrays(x, np.zeros(6, int), num_classes=10).spec.num_classes == 10


def test_the_callers_arrays_stay_writable_and_unchanged():
  x = np.ones((3, 2, 2, 1), np.float32)
  y = np.array([0, 1, 1])
  split = haq_data.from_arrays(x, y)
  x[:] = 5.0
  y[:] = 0
  images, labels = _all(split)
  assert images.max() == 1.0 and labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize("form", ["pairs", "dicts", "generator"])
def test_an_iterable_of_batches_is_concatenated(form):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((10, 3, 3, 1)).astype(np.float32)
  y = rng.integers(0, 5, 10)
  cuts = [(0, 4), (4, 7), (7, 10)]
  if form == "pairs":
    data = [(x[a:b], y[a:b]) for a, b in cuts]
  elif form == "dicts":
    data = [{"image": x[a:b], "label": y[a:b]} for a, b in cuts]
  else:
    data = ((x[a:b], y[a:b]) for a, b in cuts)
  split = haq_data.as_split(data, name="test")
  images, labels = _all(split, batch_size=4)
  assert split.name == "test"
  np.testing.assert_array_equal(images, x)
  np.testing.assert_array_equal(labels, y)


def test_as_split_takes_a_pair_a_dict_and_a_split():
  x = np.zeros((4, 2, 2, 1), np.float32)
  y = np.array([0, 1, 0, 1])
  split = haq_data.as_split((x, y))
  assert len(split) == 4
  assert len(haq_data.as_split({"image": x, "label": y})) == 4
  assert haq_data.as_split(split) is split
  # Two batches of two images each is not one (images, labels) pair.
  assert len(haq_data.as_split([(x[:2], y[:2]), (x[2:], y[2:])])) == 4


@pytest.mark.parametrize("images, labels, kwargs, match", [
    (np.zeros((4, 2, 2), np.uint8), np.zeros(4, int), {}, r"\[N, H, W, C\].*channel axis"),
    (np.zeros((4, 2, 2, 1), np.int32), np.zeros(4, int), {}, "dtype int32"),
    (np.zeros((4, 2, 2, 1), np.uint8), np.zeros(3, int), {}, r"allowed: \(4,\)"),
    (np.zeros((4, 2, 2, 1), np.uint8), np.full(4, 0.5), {}, "integer class ids"),
    (np.zeros((4, 2, 2, 1), np.uint8), np.array([0, 1, 2, -1]), {}, ">= 0"),
    (np.zeros((4, 2, 2, 1), np.uint8), np.array([0, 1, 2, 5]), {"num_classes": 3},
     r"0\.\.2"),
    (np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, int), {"mean": 0.5},
     "used as given"),
    (np.zeros((4, 2, 2, 3), np.uint8), np.zeros(4, int), {"std": (1.0, 2.0)},
     "one per channel"),
    (np.zeros((4, 2, 2, 1), np.uint8), np.zeros(4, int), {"name": "holdout"},
     "train, val, test"),
])
def test_bad_arrays_are_one_clear_error(images, labels, kwargs, match):
  with pytest.raises(ValueError, match=match):
    haq_data.from_arrays(images, labels, **kwargs)


def test_bad_data_forms_are_one_clear_error():
  with pytest.raises(ValueError, match="empty iterable"):
    haq_data.as_split([])
  with pytest.raises(ValueError, match="allowed: a haqjax Split"):
    haq_data.as_split(3)
  with pytest.raises(ValueError, match="'image' and 'label'"):
    haq_data.as_split([{"x": np.zeros((1, 2, 2, 1))}])


def test_pad_crop_flip_augments_in_memory():
  x = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
  split = haq_data.from_arrays(x, np.array([0, 1]), augmentation="pad_crop_flip")
  plain, _ = split.load(np.arange(2))
  augmented = [split.load(np.arange(2), augment=True, seed=0, epoch=e)[0] for e in range(4)]
  np.testing.assert_array_equal(plain, x)
  assert any(not np.array_equal(a, x) for a in augmented)
  assert arrays.DATASET_NAME == split.spec.name
