"""Tests of the metric writers."""

import glob
import os

from haqjax.train import writers


def test_jsonl_and_tensorboard(tmp_path):
  w = writers.create_writer(str(tmp_path), tensorboard=True)
  w.write_scalars(1, {"train/loss": 2.5, "train/top1": 0.25})
  w.write_scalars(2, {"train/loss": 1.5})
  w.close()
  records = writers.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2]
  assert records[0]["train/loss"] == 2.5 and records[1]["train/loss"] == 1.5
  events = glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0


def test_jsonl_appends_and_skips_torn_line(tmp_path):
  path = tmp_path / "m.jsonl"
  w = writers.JsonlWriter(path)
  w.write_scalars(1, {"a": 1})
  w.close()
  with open(path, "a") as f:
    f.write('{"step": 2, "a"')  # A write cut short by a crash.
  w = writers.JsonlWriter(path)
  w.write_scalars(3, {"a": 3})
  w.close()
  assert [r["step"] for r in writers.read_jsonl(path)] == [1, 3]


def test_jsonl_record_is_in_the_file_before_flush(tmp_path):
  path = tmp_path / "m.jsonl"
  w = writers.JsonlWriter(path)
  w.write_scalars(4, {"a": 0.5})
  assert [(r["step"], r["a"]) for r in writers.read_jsonl(path)] == [(4, 0.5)]
  w.close()
