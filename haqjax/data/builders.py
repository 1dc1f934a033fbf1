"""The base of haqjax's TensorFlow-free tfds builders.

Each dataset module (`digits`, `fashion_mnist`, `cifar10`, `imagenet`) defines
one `tfds.core.GeneratorBasedBuilder` subclass that turns the dataset's
original files into array_record shards, which `tfds.data_source` then reads
with random access and without TensorFlow. The builders are never registered
with tfds (their names start with `haqjax_`, so they cannot clash with tfds's
own `fashion_mnist`, `cifar10`, ...), and they describe, as class attributes,
which files they need and where to look for them, so that `prepare` can say
exactly what is missing.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from haqjax.data import specs


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TF-free builder for one of `haqjax.data.DATASETS`.

  Subclasses set `name`, `DATASET` and the source attributes, and implement
  `_split_generators` / `_generate_examples`. Examples are dicts with an
  `"image"` (see `features`) and an integer `"label"`. The stored format is
  part of `VERSION`: change one, bump the other, or old prepared copies will
  be read with the new format.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  # The haqjax dataset name, a key of `specs.DATASETS`.
  DATASET: str = ""
  # Name of the split holding the dataset's own test (or validation) set.
  TEST_SPLIT = "test"
  # Whether the builder reads files from a manual dir (False: bundled data).
  NEEDS_SOURCE_FILES = True
  # The source files, for messages: "the four idx files".
  SOURCE_FILES = ""
  # How to get the source files, for messages; a sentence fragment.
  HOW_TO_GET = ""
  # Where the source files are usually installed, searched after manual_dir.
  STANDARD_DIRS: tuple[str, ...] = ()
  # tfds's own builder for the same data, whose array_record output is read
  # as is when it is already prepared (None: no such builder).
  TFDS_NAME: str | None = None
  TFDS_TEST_SPLIT = "test"
  HOMEPAGE = ""
  CITATION = ""

  @classmethod
  def has_source_files(cls, directory: str) -> bool:
    """Whether `directory` holds everything `_split_generators` needs."""
    raise NotImplementedError

  @classmethod
  def source_dirs(cls, data_dir: str) -> tuple[str, ...]:
    """Standard places for the source files, in search order."""
    return cls.STANDARD_DIRS + (os.path.join(data_dir, "downloads", "manual"),)

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    """The stored features.

    Small datasets store raw uint8 pixels of the final shape (decoding is a
    copy); subclasses with other needs override this.
    """
    spec = specs.get_spec(self.DATASET)
    return {
        "image": tfds.features.Tensor(shape=spec.image_shape, dtype=np.uint8,
                                      encoding=tfds.features.Encoding.BYTES),
        "label": tfds.features.ClassLabel(names=spec.class_names),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    spec = specs.get_spec(self.DATASET)
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{spec.name}, prepared by haqjax from the original files "
                     "without TensorFlow."),
        features=tfds.features.FeaturesDict(self.features()),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE or None,
        citation=self.CITATION or None,
    )
