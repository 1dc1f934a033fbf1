"""Tests of the ImageNet builder and streaming on a tiny fake ImageNet."""

import io
import os
import tarfile

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from haqjax import data
from haqjax.data import imagenet
from haqjax.data import specs

SYNSETS = ("n01440764", "n01443537", "n01484850")  # Labels 0, 1, 2.
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
SIZES = ((300, 200), (180, 260), (64, 48))  # (width, height)
VAL = ((1, 2), (2, 0), (3, 1), (4, 0))  # (image number, label)


@pytest.fixture(autouse=True)
def _no_user_dirs(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("HAQJAX_DATA_DIR", str(tmp_path / "haqjax"))


def _encode(colour, size, fmt="JPEG", mode="RGB") -> bytes:
  image = PIL.Image.new("RGB", size, colour)
  if mode != "RGB":
    image = image.convert(mode)
  out = io.BytesIO()
  image.save(out, format=fmt, quality=95)
  return out.getvalue()


def _tar(files: dict[str, bytes]) -> bytes:
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode="w") as tar:
    for name, contents in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(contents)
      tar.addfile(info, io.BytesIO(contents))
  return out.getvalue()


def _fake_imagenet(directory, labels_file="txt", synsets=SYNSETS,
                   val=VAL) -> None:
  """Writes the two tars (and a labels file) into `directory`."""
  os.makedirs(directory, exist_ok=True)
  class_tars = {}
  for label, synset in enumerate(synsets):
    files = {}
    for i, size in enumerate(SIZES):
      files[f"{synset}_{i}.JPEG"] = _encode(COLOURS[label % 3], size)
    extra = {0: _encode(COLOURS[0], (120, 90), mode="L"),  # Grey JPEG.
             1: _encode(COLOURS[1], (100, 80), mode="CMYK"),  # CMYK JPEG.
             2: _encode(COLOURS[2], (90, 120), fmt="PNG")}  # PNG as .JPEG.
    files[f"{synset}_9.JPEG"] = extra[label % 3]
    class_tars[f"{synset}.tar"] = _tar(files)
  with open(os.path.join(directory, imagenet.TRAIN_TAR), "wb") as f:
    f.write(_tar(class_tars))
  with open(os.path.join(directory, imagenet.VAL_TAR), "wb") as f:
    f.write(_tar({f"ILSVRC2012_val_{n:08d}.JPEG":
                      _encode(COLOURS[y], (250, 180)) for n, y in val}))
  if labels_file == "txt":
    with open(os.path.join(directory, "validation_labels.txt"), "w") as f:
      f.write("\n".join(SYNSETS[y] for _, y in sorted(val)) + "\n")
  elif labels_file == "csv":
    with open(os.path.join(directory, "LOC_val_solution.csv"), "w") as f:
      f.write("ImageId,PredictionString\n")
      for n, y in val:
        boxes = f"{SYNSETS[y]} 1 2 3 4 {SYNSETS[y]} 5 6 7 8"
        f.write(f"ILSVRC2012_val_{n:08d},{boxes}\n")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  _fake_imagenet(root / "manual")
  return str(root / "d"), str(root / "manual")


def _load(prepared, **kwargs):
  data_dir, manual_dir = prepared
  return data.load("imagenet2012", data_dir=data_dir, manual_dir=manual_dir,
                   **kwargs)


def test_counts_and_labels(prepared):
  splits = _load(prepared, val_size=2)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 2, 4)
  assert splits.spec.num_classes == 1000 and not splits.train.in_memory
  _, test_labels = splits.test.load(np.arange(4))
  builder = data.prepare("imagenet2012", data_dir=prepared[0]).builder
  source = builder.as_data_source("validation")
  names = [source[i]["file_name"] for i in range(4)]
  numbers = [int(n[-13:-5]) for n in names]
  assert sorted(numbers) == [1, 2, 3, 4]
  np.testing.assert_array_equal(test_labels, [dict(VAL)[n] for n in numbers])
  train_labels = np.concatenate([s.load(np.arange(len(s)))[1]
                                 for s in (splits.train, splits.val)])
  np.testing.assert_array_equal(np.bincount(train_labels), [4, 4, 4])


def test_stored_images_are_rgb_or_grey_jpegs(prepared):
  builder = data.prepare("imagenet2012", data_dir=prepared[0]).builder
  source = builder.as_data_source(
      "train", decoders={"image": tfds.decode.SkipDecoding()})
  modes = {}
  for i in range(len(source)):
    record = source[i]
    image = PIL.Image.open(io.BytesIO(record["image"]))
    assert image.format == "JPEG"
    modes[record["file_name"].decode()] = image.mode
  assert modes[f"{SYNSETS[0]}_9.JPEG"] == "L"  # Kept as it was.
  assert modes[f"{SYNSETS[1]}_9.JPEG"] == "RGB"  # Was CMYK.
  assert modes[f"{SYNSETS[2]}_9.JPEG"] == "RGB"  # Was a PNG.


def test_eval_batches_at_224(prepared):
  splits = _load(prepared, val_size=0)
  batches = list(data.batches(splits.train, batch_size=8, shuffle=False,
                              drop_remainder=False))
  assert len(batches) == 2
  for batch in batches:
    assert batch["image"].shape == (8, 224, 224, 3)
    assert batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batches[1]["mask"], [1] * 4 + [0] * 4)
  # Solid colours survive decoding, CMYK and PNG repair, and resizing; the
  # grey JPEG comes out grey, in three channels.
  spec = splits.spec
  colours = []
  for batch in batches:
    for image, label, mask in zip(batch["image"], batch["label"],
                                  batch["mask"]):
      if mask:
        rgb = (image * spec.std + spec.mean) * 255.0  # [224, 224, 3]
        assert rgb.std(axis=(0, 1)).max() < 1.0
        grey = PIL.Image.new("RGB", (1, 1), COLOURS[label]).convert("L")
        candidates = [COLOURS[label], (grey.getpixel((0, 0)),) * 3]
        distance = [np.abs(rgb.mean(axis=(0, 1)) - c).max() for c in candidates]
        assert min(distance) < 6, (label, rgb.mean(axis=(0, 1)))
        colours.append(int(np.argmin(distance)))
  assert colours.count(1) == 1  # The one grey image.


def test_training_augmentation_is_deterministic(prepared):
  splits = _load(prepared, val_size=0)

  def epoch(seed, epoch_, **kwargs):
    return list(data.batches(splits.train, batch_size=4, seed=seed,
                             epoch=epoch_, shuffle=True, drop_remainder=True,
                             augment=True, **kwargs))

  a, b = epoch(0, 0), epoch(0, 0, prefetch=0)
  assert len(a) == 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  c = epoch(0, 1)
  assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))
  # Per-example randomness: the same example gets the same crop whatever
  # batch it is read in.
  rows = np.array([0, 5, 9])
  one = splits.train.load(rows, augment=True, seed=4, epoch=2)[0]
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(
        splits.train.load(np.array([row]), augment=True, seed=4, epoch=2)[0][0],
        one[i])


def test_sharded_streaming_batches(prepared):
  import jax  # pylint: disable=g-import-not-at-top
  splits = _load(prepared, val_size=0)
  sharding = jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)),
                                        jax.sharding.PartitionSpec("data"))
  batch = next(data.batches(splits.test, batch_size=8, shuffle=False,
                            drop_remainder=False, sharding=sharding))
  assert batch["image"].shape == (8, 224, 224, 3)
  assert isinstance(batch["image"], jax.Array)
  np.testing.assert_array_equal(np.asarray(batch["mask"]), [1] * 4 + [0] * 4)


@pytest.mark.parametrize("labels_file", ["csv", "tfds"])
def test_other_validation_label_sources(tmp_path, labels_file):
  _fake_imagenet(tmp_path / "manual", labels_file=labels_file)
  splits = data.load("imagenet2012", data_dir=str(tmp_path / "d"),
                     manual_dir=str(tmp_path / "manual"), val_size=0)
  if labels_file == "csv":
    expected = {n: y for n, y in VAL}
  else:  # tfds's own file: line n is the synset of image n.
    path = specs.tfds_package_file(
        "datasets/imagenet2012/validation_labels.txt")
    lines = path.read_text().split()
    classes = specs.imagenet_synsets()
    expected = {n: classes.index(lines[n - 1]) for n, _ in VAL}
  builder = data.prepare("imagenet2012", data_dir=str(tmp_path / "d")).builder
  source = builder.as_data_source("validation")
  got = {int(source[i]["file_name"][-13:-5]): source[i]["label"]
         for i in range(len(source))}
  assert got == expected
  assert len(splits.test) == 4


def test_missing_tars_error(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / imagenet.TRAIN_TAR).write_bytes(b"")  # Only one of the two.
  with pytest.raises(data.DataNotFoundError) as e:
    data.load("imagenet2012", data_dir=str(tmp_path / "d"),
              manual_dir=str(manual))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("dataset 'imagenet2012': ILSVRC2012_img_train.tar "
                            "and ILSVRC2012_img_val.tar not found in ")
  assert str(manual) in message
  assert "https://image-net.org/download-images" in message
  assert "--manual_dir=DIR" in message


def test_unknown_synset_is_an_error(tmp_path):
  _fake_imagenet(tmp_path / "manual", synsets=("n01440764", "n99999999"))
  with pytest.raises(data.CorruptDataError, match="'n99999999', which is not "
                     "one of the 1000"):
    data.load("imagenet2012", data_dir=str(tmp_path / "d"),
              manual_dir=str(tmp_path / "manual"))
  assert not (tmp_path / "d" / "haqjax_imagenet2012" / "1.0.0").exists()


def test_validation_image_without_label_is_an_error(tmp_path):
  _fake_imagenet(tmp_path / "manual", val=VAL + ((9, 0),))
  (tmp_path / "manual" / "validation_labels.txt").write_text(
      "\n".join(SYNSETS[y] for _, y in VAL) + "\n")
  with pytest.raises(data.CorruptDataError,
                     match="ILSVRC2012_val_00000009.JPEG has no label"):
    data.load("imagenet2012", data_dir=str(tmp_path / "d"),
              manual_dir=str(tmp_path / "manual"))


def test_truncated_train_tar_is_an_error(tmp_path):
  _fake_imagenet(tmp_path / "manual")
  path = tmp_path / "manual" / imagenet.TRAIN_TAR
  path.write_bytes(path.read_bytes()[:3000])
  with pytest.raises(data.CorruptDataError, match="is not a complete tar file"):
    data.load("imagenet2012", data_dir=str(tmp_path / "d"),
              manual_dir=str(tmp_path / "manual"))
