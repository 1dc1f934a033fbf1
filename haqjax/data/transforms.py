"""Image preprocessing and augmentation on the host, in numpy and PIL.

Every random choice is a pure function of `(seed, epoch, example)`, so a batch
is the same whatever the batch size, the number of processes or the number of
decode threads, and a resumed run sees the same images as an uninterrupted one.

* CIFAR-10 (`pad_crop_flip`): zero-pad 4 pixels, crop back at a random offset,
  flip horizontally with probability 1/2 (He et al., 2016).
* ImageNet training (`random_resized_crop`): a crop of 8%-100% of the area with
  aspect ratio in [3/4, 4/3], resized to 224x224, flipped with probability 1/2
  (Szegedy et al., 2015; the torchvision algorithm, 10 tries then a centre
  crop).
* ImageNet evaluation (`center_crop`): resize the short side to 256, crop the
  central 224x224. The crop is taken in source coordinates and resized in one
  PIL call, which equals resize-then-crop up to sub-pixel rounding.

Resizing uses PIL's bilinear filter, which antialiases when shrinking.

References:
  He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR
  2016.
  Szegedy et al., "Going Deeper with Convolutions", CVPR 2015.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import PIL.Image

# First words of the numpy seed sequences, one per use, so that no two uses
# share a random stream. (numpy treats trailing zero words as absent, hence
# a leading, non-zero tag and a fixed length per tag.)
SHUFFLE_TAG = 1
PAD_CROP_FLIP_TAG = 2
PER_EXAMPLE_TAG = 3

CIFAR_PAD = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_TRIES = 10
EVAL_RESIZE = 256


def normalize(images: np.ndarray, mean: tuple[float, ...],
              std: tuple[float, ...], out: np.ndarray | None = None
              ) -> np.ndarray:
  """`(images / 255 - mean) / std` per channel, as float32.

  Args:
    images: uint8 `[..., C]`.
    mean: per-channel mean of pixel values in `[0, 1]`.
    std: per-channel standard deviation of pixel values in `[0, 1]`.
    out: optional float32 array of the same shape to write into.

  Returns:
    float32 array of the same shape (`out` if given).
  """
  std = np.asarray(std, np.float64)
  scale = (1.0 / (255.0 * std)).astype(np.float32)
  bias = (-np.asarray(mean, np.float64) / std).astype(np.float32)
  if out is None:
    out = np.empty(images.shape, np.float32)
  np.multiply(images, scale, out=out)
  out += bias
  return out


@functools.lru_cache(maxsize=8)
def _pad_crop_flip_table(seed: int, epoch: int, size: int, pad: int
                         ) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng([PAD_CROP_FLIP_TAG, seed, epoch])
  offsets = rng.integers(0, 2 * pad + 1, size=(size, 2))  # [N, (dy, dx)]
  flips = rng.random(size) < 0.5  # [N]
  offsets.setflags(write=False)
  flips.setflags(write=False)
  return offsets, flips


def pad_crop_flip_params(seed: int, epoch: int, examples: np.ndarray,
                         num_examples: int, pad: int = CIFAR_PAD
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Crop offsets and flips of `examples` in epoch `epoch`.

  Args:
    seed: the run's data seed.
    epoch: the epoch.
    examples: int `[B]`, example indices in `0..num_examples - 1`.
    num_examples: size of the whole dataset the indices refer to.
    pad: padding on each side.

  Returns:
    `offsets` int `[B, 2]` (row, column) in `0..2 * pad` and `flips` bool `[B]`.
  """
  offsets, flips = _pad_crop_flip_table(seed, epoch, num_examples, pad)
  return offsets[examples], flips[examples]


def pad_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                  pad: int = CIFAR_PAD) -> np.ndarray:
  """Zero-pads, crops back to size at `offsets`, and flips where `flips`.

  Args:
    images: uint8 `[B, H, W, C]`.
    offsets: int `[B, 2]`, top-left corner of each crop in the padded image.
    flips: bool `[B]`, whether to mirror each image left-right.
    pad: padding on each side.

  Returns:
    uint8 `[B, H, W, C]`.
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = offsets[:, 0, None] + np.arange(h)  # [B, H]
  cols = offsets[:, 1, None] + np.arange(w)  # [B, W]
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  batch = np.arange(b)[:, None, None]
  return padded[batch, rows[:, :, None], cols[:, None, :]]


def example_rng(seed: int, epoch: int, example: int) -> np.random.Generator:
  """The random stream of one example in one epoch."""
  return np.random.default_rng([PER_EXAMPLE_TAG, seed, epoch, example])


def decode_rgb(data: bytes) -> PIL.Image.Image:
  """Decodes encoded image bytes (JPEG, PNG, ...) into an RGB PIL image."""
  image = PIL.Image.open(io.BytesIO(data))
  if image.mode != "RGB":
    image = image.convert("RGB")
  image.load()
  return image


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO
                            ) -> tuple[int, int, int, int]:
  """A random crop `(left, top, right, bottom)` of a `width x height` image.

  The crop covers a fraction of the area drawn uniformly from `scale`, with
  an aspect ratio (w/h) drawn log-uniformly from `ratio`; after `RRC_TRIES`
  draws that do not fit, it is the largest central crop within `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(RRC_TRIES):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def random_resized_crop(image: PIL.Image.Image, rng: np.random.Generator,
                        size: int) -> np.ndarray:
  """Inception-style training crop and flip; uint8 `[size, size, 3]`."""
  box = random_resized_crop_box(rng, image.width, image.height)
  out = np.asarray(image.resize((size, size), PIL.Image.BILINEAR, box=box))
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def center_crop(image: PIL.Image.Image, size: int,
                resize: int = EVAL_RESIZE) -> np.ndarray:
  """Resizes the short side to `resize`, crops the central `size` square.

  Returns:
    uint8 `[size, size, 3]`.
  """
  factor = resize / min(image.width, image.height)
  crop_w = min(size / factor, image.width)
  crop_h = min(size / factor, image.height)
  left = (image.width - crop_w) / 2
  top = (image.height - crop_h) / 2
  return np.asarray(image.resize((size, size), PIL.Image.BILINEAR,
                                 box=(left, top, left + crop_w, top + crop_h)))
