"""ILSVRC 2012 ImageNet from its two official tar files, as a tfds builder.

The manual dir holds, as tfds documents for its own `imagenet2012`::

    ILSVRC2012_img_train.tar  # 1,000 tars nXXXXXXXX.tar, 1,281,167 JPEGs in all
    ILSVRC2012_img_val.tar    # 50,000 JPEGs ILSVRC2012_val_00000001.JPEG, ...

(download both from https://image-net.org/download-images after registering).
Labels are the positions of the synset ids in sorted order, the order of tfds's
`imagenet2012`. Validation labels come from the first of these that exists:

* `LOC_val_solution.csv` in the manual dir (the Kaggle ILSVRC format:
  `ImageId,PredictionString` with the synset first in `PredictionString`);
* `validation_labels.txt` in the manual dir (one synset per line, line `n`
  for image `n`; tfds's format);
* the `validation_labels.txt` that ships inside `tensorflow_datasets`.

Images are stored as JPEG bytes and decoded at read time (see
`haqjax.data.transforms`). Like tfds, preparing repairs the two known quirks of
the training set: 22 CMYK JPEGs and one PNG named `.JPEG` are re-encoded as
RGB JPEGs; here any such file is detected by its content, not its name.

References:
  Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge",
  IJCV 115(3), 2015.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import tarfile
import zlib
from collections.abc import Iterator

from absl import logging
import PIL.Image
import tensorflow_datasets as tfds

from haqjax.data import builders
from haqjax.data import errors
from haqjax.data import specs

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
KAGGLE_LABELS = "LOC_val_solution.csv"
TFDS_LABELS = "validation_labels.txt"
JPEG_QUALITY = 95  # For the few re-encoded images.
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})(\.JPEG)?")


def _image_number(name: str) -> int | None:
  match = _VAL_NAME.fullmatch(os.path.basename(name))
  return int(match.group(1)) if match else None


@functools.cache
def _labels_by_synset() -> dict[str, int]:
  return {synset: i for i, synset in enumerate(specs.imagenet_synsets())}


def _synset_index(synset: str, where: str) -> int:
  """The label of `synset`; `where` names the file that mentions it."""
  index = _labels_by_synset().get(synset)
  if index is None:
    raise errors.CorruptDataError(
        f"{where} names synset {synset!r}, which is not one of the 1000 "
        "ImageNet 2012 classes")
  return index


def validation_labels_file(directory: str) -> str:
  """The validation labels file used for the manual dir `directory`."""
  for name in (KAGGLE_LABELS, TFDS_LABELS):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return os.fspath(specs.tfds_package_file(
      "datasets/imagenet2012/validation_labels.txt",
      "image_classification/imagenet2012_validation_labels.txt"))


def read_validation_labels(path: str) -> dict[int, int]:
  """Reads validation labels, `{image number (from 1): label}`.

  Args:
    path: a `LOC_val_solution.csv` (Kaggle) file, or a text file with one
      synset id per line, line `n` for `ILSVRC2012_val_{n:08d}.JPEG`.

  Returns:
    The label of each validation image, by its number.

  Raises:
    CorruptDataError: if the file cannot be parsed or names unknown synsets.
  """
  labels = {}
  if path.endswith(".csv"):
    with open(path, newline="") as f:
      rows = csv.reader(f)
      header = next(rows, None)
      if header is None or [h.strip() for h in header[:2]] != [
          "ImageId", "PredictionString"]:
        raise errors.CorruptDataError(
            f"{path} has header {header}; expected ImageId,PredictionString")
      for line, row in enumerate(rows, start=2):
        number = _image_number(row[0]) if row else None
        if number is None or len(row) < 2 or not row[1].split():
          raise errors.CorruptDataError(
              f"{path}:{line} is {row}; expected "
              "ILSVRC2012_val_NNNNNNNN,<synset> ...")
        labels[number] = _synset_index(row[1].split()[0], f"{path}:{line}")
  else:
    with open(path) as f:
      for number, line in enumerate(f.read().split(), start=1):
        labels[number] = _synset_index(line, f"{path}:{number}")
  if not labels:
    raise errors.CorruptDataError(f"{path} holds no labels")
  return labels


def fix_image(data: bytes, where: str) -> bytes:
  """Returns `data` if it is an RGB or grey JPEG, else it re-encoded as one.

  ImageNet's training set holds CMYK JPEGs and a PNG named `.JPEG`; both
  would decode wrongly (or not at all) as JPEG later.

  Raises:
    CorruptDataError: if `data` is not an image PIL can read.
  """
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      if image.format == "JPEG" and image.mode in ("RGB", "L"):
        return data
      logging.info("re-encoding %s (%s, %s) as an RGB JPEG", where,
                   image.format, image.mode)
      rgb = image.convert("RGB")
  except (PIL.UnidentifiedImageError, OSError) as e:
    raise errors.CorruptDataError(
        f"{where} is not a readable image ({e})") from e
  out = io.BytesIO()
  rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


def _tar_files(where: str, *, path: str | None = None,
               contents: bytes | None = None) -> Iterator[tuple[str, bytes]]:
  """Yields `(name, contents)` of the regular files of a tar, in one pass.

  Args:
    where: the tar's name for messages.
    path: the tar file to read, or
    contents: the tar's bytes.
  """
  fileobj = None if contents is None else io.BytesIO(contents)
  try:
    with tarfile.open(name=path, fileobj=fileobj, mode="r|*") as tar:
      for member in tar:
        if member.isfile():
          yield member.name, tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, zlib.error) as e:
    raise errors.CorruptDataError(
        f"{where} is not a complete tar file ({e}); download it again") from e


class Imagenet2012Builder(builders.Builder, skip_registration=True):
  """ImageNet 2012 train and validation sets from the official tar files."""

  name = "haqjax_imagenet2012"
  DATASET = "imagenet2012"
  TEST_SPLIT = "validation"
  SOURCE_FILES = f"{TRAIN_TAR} and {VAL_TAR}"
  HOW_TO_GET = ("download both from https://image-net.org/download-images "
                "(free registration) into a directory and pass "
                "--manual_dir=DIR")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"manual_dir holds {SOURCE_FILES}; {HOW_TO_GET}.")
  TFDS_NAME = "imagenet2012"
  TFDS_TEST_SPLIT = "validation"
  HOMEPAGE = "https://image-net.org/"
  CITATION = """@article{russakovsky2015imagenet,
  title={ImageNet Large Scale Visual Recognition Challenge},
  author={Russakovsky, Olga and Deng, Jia and Su, Hao and Krause, Jonathan and Satheesh, Sanjeev and Ma, Sean and Huang, Zhiheng and Karpathy, Andrej and Khosla, Aditya and Bernstein, Michael and Berg, Alexander C. and Fei-Fei, Li},
  journal={International Journal of Computer Vision},
  volume={115}, number={3}, pages={211--252}, year={2015}}"""

  @classmethod
  def has_source_files(cls, directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name))
               for name in (TRAIN_TAR, VAL_TAR))

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    # JPEG bytes are stored as they are (no TensorFlow needed to write them)
    # and decoded by haqjax with PIL.
    return {
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(
            names=specs.get_spec(self.DATASET).class_names),
        "file_name": tfds.features.Text(),
    }

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    directory = os.fspath(dl_manager.manual_dir)
    labels_path = validation_labels_file(directory)
    logging.info("imagenet2012: validation labels from %s", labels_path)
    labels = read_validation_labels(labels_path)
    return {
        "train": self._generate_examples(os.path.join(directory, TRAIN_TAR)),
        "validation": self._generate_examples(
            os.path.join(directory, VAL_TAR), labels, labels_path),
    }

  def _generate_examples(self, path: str, labels: dict[int, int] | None = None,
                         labels_path: str | None = None):
    if labels is None:
      yield from self._generate_train(path)
    else:
      yield from self._generate_validation(path, labels, labels_path)

  def _generate_train(self, path: str):
    """Yields the training images; the outer tar is read in one pass."""
    count = 0
    for class_tar, contents in _tar_files(path, path=path):
      where = f"{path}:{class_tar}"
      label = _synset_index(os.path.basename(class_tar).split(".")[0], where)
      for name, data in _tar_files(where, contents=contents):
        file_name = os.path.basename(name)
        image = fix_image(data, f"{where}:{name}")
        count += 1
        yield file_name, {"image": image, "label": label,
                          "file_name": file_name}
    if not count:
      raise errors.CorruptDataError(f"{path} holds no images")

  def _generate_validation(self, path: str, labels: dict[int, int],
                           labels_path: str):
    """Yields the validation images with their labels."""
    count = 0
    for name, data in _tar_files(path, path=path):
      file_name = os.path.basename(name)
      number = _image_number(file_name)
      if number is None or number not in labels:
        raise errors.CorruptDataError(
            f"{path}:{name} has no label in {labels_path}; expected "
            "ILSVRC2012_val_NNNNNNNN.JPEG with NNNNNNNN listed there")
      count += 1
      yield file_name, {"image": fix_image(data, f"{path}:{name}"),
                        "label": labels[number], "file_name": file_name}
    if not count:
      raise errors.CorruptDataError(f"{path} holds no images")
