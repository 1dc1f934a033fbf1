"""Prepares datasets ahead of time, e.g. ImageNet before a multi-host run.

    python -m haqjax.data imagenet2012 --manual_dir=/data/imagenet
    python -m haqjax.data digits fashion_mnist --data_dir=/tmp/datasets
"""

import argparse
import sys

from absl import logging

from haqjax.data import errors
from haqjax.data import preparation
from haqjax.data import specs


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m haqjax.data",
      description="Prepare datasets into array_record files for haqjax.")
  parser.add_argument("datasets", nargs="+", choices=specs.DATASETS,
                      metavar="DATASET",
                      help=f"one or more of {', '.join(specs.DATASETS)}")
  parser.add_argument("--data_dir", default=None,
                      help="where prepared data lives (default: "
                      f"${preparation.DATA_DIR_ENV}, else "
                      f"{preparation.DEFAULT_DATA_DIR})")
  parser.add_argument("--manual_dir", default=None,
                      help="directory holding the source files")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  for name in args.datasets:
    try:
      prepared = preparation.prepare(name, data_dir=args.data_dir,
                                     manual_dir=args.manual_dir)
    except (errors.DataNotFoundError, errors.CorruptDataError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    splits = prepared.builder.info.splits
    print(f"{name}: {prepared.path} ("
          + ", ".join(f"{s}: {splits[s].num_examples}"
                      for s in (prepared.train_split, prepared.test_split))
          + ")")
  return 0


if __name__ == "__main__":
  sys.exit(main())
