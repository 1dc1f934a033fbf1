"""scikit-learn's bundled 8x8 handwritten digits, as a tfds builder.

1,797 grey images of the digits 0-9 with pixel values 0..16, shipped inside
scikit-learn, so this dataset needs no download. Values are scaled to 0..255.
The test split is a fixed stratified 20% (360 images) drawn with seed 0; the
remaining 1,437 images are the train split. Smoke runs and tests use it.

References:
  Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine
  Learning Repository, 1998.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from haqjax.data import builders

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_arrays() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Returns `{split: (keys, images uint8 [N, 8, 8, 1], labels int64 [N])}`."""
  # Imported here: scikit-learn takes seconds to import and only this needs it.
  # pylint: disable=g-import-not-at-top
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection
  # pylint: enable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  keys = np.arange(len(labels))
  train, test = model_selection.train_test_split(
      keys, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
  return {name: (np.sort(k), images[np.sort(k)], labels[np.sort(k)])
          for name, k in (("train", train), ("test", test))}


class DigitsBuilder(builders.Builder, skip_registration=True):
  """scikit-learn's `load_digits()`, split 80/20 (stratified, seed 0)."""

  name = "haqjax_digits"
  DATASET = "digits"
  NEEDS_SOURCE_FILES = False
  SOURCE_FILES = "scikit-learn's bundled digits"
  HOW_TO_GET = "install scikit-learn with `pip install scikit-learn`"
  HOMEPAGE = ("https://archive.ics.uci.edu/dataset/80/"
              "optical+recognition+of+handwritten+digits")

  @classmethod
  def has_source_files(cls, directory: str) -> bool:
    del directory  # The data ships with scikit-learn.
    return True

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    arrays = load_arrays()
    return {name: self._generate_examples(*arrays[name])
            for name in ("train", "test")}

  def _generate_examples(self, keys, images, labels):
    for key, image, label in zip(keys, images, labels):
      yield int(key), {"image": image, "label": int(label)}
