"""Tests of haqjax.data.transforms."""

import io
import math

import numpy as np
import PIL.Image
import pytest

from haqjax.data import transforms


def test_normalize():
  images = np.array([[[[0, 255, 51]]]], np.uint8)
  out = transforms.normalize(images, (0.5, 0.5, 0.2), (0.25, 0.5, 0.1))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], [-2.0, 1.0, 0.0], atol=1e-6)


def test_pad_crop_flip_params_depend_on_seed_epoch_and_example_only():
  a = transforms.pad_crop_flip_params(1, 2, np.array([3, 4, 5]), 10)
  b = transforms.pad_crop_flip_params(1, 2, np.array([5, 3]), 10)
  np.testing.assert_array_equal(a[0][[2, 0]], b[0])
  np.testing.assert_array_equal(a[1][[2, 0]], b[1])
  offsets, flips = transforms.pad_crop_flip_params(0, 0, np.arange(1000), 1000)
  assert offsets.min() == 0 and offsets.max() == 8
  assert 0.4 < flips.mean() < 0.6
  other = transforms.pad_crop_flip_params(0, 1, np.arange(1000), 1000)
  assert not np.array_equal(offsets, other[0])


def test_pad_crop_flip_extremes():
  images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1) + 1
  out = transforms.pad_crop_flip(images, np.array([[4, 4], [0, 8]]),
                                 np.array([False, True]), pad=4)
  np.testing.assert_array_equal(out[0], images[0])  # Centre, no flip.
  np.testing.assert_array_equal(out[1], 0)  # Entirely in the padding.
  out = transforms.pad_crop_flip(images, np.array([[4, 4], [4, 4]]),
                                 np.array([True, True]), pad=4)
  np.testing.assert_array_equal(out, images[:, :, ::-1])
  out = transforms.pad_crop_flip(images, np.array([[5, 4], [4, 4]]),
                                 np.array([False, False]), pad=4)
  np.testing.assert_array_equal(out[0, :3], images[0, 1:])  # Shifted up.
  np.testing.assert_array_equal(out[0, 3], 0)


@pytest.mark.parametrize("width, height", [(500, 375), (100, 1000), (224, 224),
                                           (3000, 40)])
def test_random_resized_crop_box(width, height):
  areas, ratios = [], []
  for example in range(300):
    rng = transforms.example_rng(0, 0, example)
    left, top, right, bottom = transforms.random_resized_crop_box(
        rng, width, height)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    areas.append(w * h / (width * height))
    ratios.append(w / h)
  if 3 / 4 <= width / height <= 4 / 3:
    assert min(areas) < 0.2 and max(areas) > 0.8
    assert min(ratios) > 0.7 and max(ratios) < 1.4
  if width / height > 4 / 3 * 10:  # Nothing fits: the central fallback.
    assert set(areas) == {areas[0]}


def test_random_resized_crop_is_deterministic_per_example():
  image = PIL.Image.fromarray(
      np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8))
  a = transforms.random_resized_crop(image, transforms.example_rng(1, 2, 3), 32)
  b = transforms.random_resized_crop(image, transforms.example_rng(1, 2, 3), 32)
  c = transforms.random_resized_crop(image, transforms.example_rng(1, 3, 3), 32)
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_center_crop_matches_resize_then_crop():
  # A smooth image, so that the one-call crop+resize equals resize-then-crop
  # up to interpolation at the edges.
  y, x = np.mgrid[0:300, 0:400]
  pixels = np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700],
                    axis=-1).astype(np.uint8)
  image = PIL.Image.fromarray(pixels)
  out = transforms.center_crop(image, size=224, resize=256)
  assert out.shape == (224, 224, 3)
  resized = image.resize((round(400 * 256 / 300), 256), PIL.Image.BILINEAR)
  left = (resized.width - 224) // 2
  top = (resized.height - 224) // 2
  expected = np.asarray(resized)[top:top + 224, left:left + 224]
  assert np.abs(out.astype(int) - expected).max() <= 2


def test_center_crop_of_a_small_image_upsamples():
  image = PIL.Image.new("RGB", (40, 30), (10, 20, 30))
  out = transforms.center_crop(image, size=224, resize=256)
  assert out.shape == (224, 224, 3)
  np.testing.assert_array_equal(out, np.broadcast_to([10, 20, 30], out.shape))


def test_decode_rgb_handles_grey_cmyk_and_png():
  for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                    ("P", "PNG")):
    image = PIL.Image.new("RGB", (8, 6), (100, 150, 200)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    decoded = transforms.decode_rgb(buffer.getvalue())
    assert decoded.mode == "RGB" and decoded.size == (8, 6)


def test_random_streams_are_distinct():
  # numpy drops trailing zero words of a seed; tags keep the streams apart.
  shuffle = np.random.default_rng([transforms.SHUFFLE_TAG, 0, 0]).random()
  example = transforms.example_rng(0, 0, 0).random()
  assert not math.isclose(shuffle, example)
