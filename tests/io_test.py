"""Tests of the atomic JSON and JSON-lines helpers."""

import fcntl
import json
import math
import os
import threading
import time

import pytest
from launcher_testing import hold_folder

from haqjax import io as haq_io


def test_write_json_is_indented_and_atomic(tmp_path):
  path = tmp_path / "sub" / "a.json"
  haq_io.write_json(path, {"a": [1, 2], "b": None})
  assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": null\n}\n'
  with pytest.raises(TypeError):
    haq_io.write_json(path, {"a": object()})
  assert json.loads(path.read_text()) == {"a": [1, 2], "b": None}
  assert os.listdir(path.parent) == ["a.json"]  # No temporary file left.


def test_write_jsonl_replaces_the_file(tmp_path):
  path = tmp_path / "r.jsonl"
  haq_io.write_jsonl(path, [{"step": 1}, {"step": 2, "x": [1.5]}])
  assert path.read_text() == '{"step": 1}\n{"step": 2, "x": [1.5]}\n'
  haq_io.write_jsonl(path, ({"step": s} for s in (7,)))  # Any iterable.
  assert haq_io.read_jsonl(path) == [{"step": 7}]


def test_write_jsonl_keeps_the_old_file_when_records_fail(tmp_path):
  path = tmp_path / "r.jsonl"
  haq_io.write_jsonl(path, [{"step": 1}])

  def records():
    yield {"step": 2}
    raise RuntimeError("cut short")

  with pytest.raises(RuntimeError, match="cut short"):
    haq_io.write_jsonl(path, records())
  assert path.read_text() == '{"step": 1}\n'
  assert os.listdir(tmp_path) == ["r.jsonl"]


def test_append_jsonl_creates_then_appends(tmp_path):
  path = tmp_path / "new" / "r.jsonl"
  haq_io.append_jsonl(path, [{"step": 1}])
  haq_io.append_jsonl(path, [{"step": 2}, {"step": 3}])
  haq_io.append_jsonl(path, [])
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_a_torn_line_is_ended_on_append_and_skipped_on_read(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text('{"step": 1}\n{"step": 2, "lo')  # A write cut short by a crash.
  haq_io.append_jsonl(path, [{"step": 3}])
  assert path.read_text() == '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'
  assert haq_io.read_jsonl(path) == [{"step": 1}, {"step": 3}]


def test_read_jsonl_round_trips_nan_and_skips_blank_lines(tmp_path):
  path = tmp_path / "r.jsonl"
  haq_io.write_jsonl(path, [{"loss": float("nan")}, {"loss": 1.0}])
  with open(path, "a") as f:
    f.write("\n")
  records = haq_io.read_jsonl(path)
  assert len(records) == 2 and math.isnan(records[0]["loss"]) and records[1]["loss"] == 1.0
  with pytest.raises(FileNotFoundError):
    haq_io.read_jsonl(tmp_path / "missing.jsonl")


def test_a_claimed_folder_belongs_to_one_process(tmp_path):
  run = tmp_path / "run"
  assert haq_io.lock_path(run) == haq_io.lock_path(tmp_path / "x" / ".." / "run")
  assert haq_io.lock_path(run) != haq_io.lock_path(run, part="process 1")
  with hold_folder(run):
    with pytest.raises(haq_io.Busy, match=r"^workdir=.*run is in use by another run "
                       r"\(pid 4242\); allowed: one run per folder"):
      haq_io.claim(run)
    with pytest.raises(haq_io.Busy):
      with haq_io.exclusive(run, wait=False):
        pass
    haq_io.claim(run, part="process 1")  # Another part of it is free.
    haq_io.release(run, part="process 1")
  haq_io.claim(run)
  haq_io.claim(run)  # Held already: nothing to do.
  with haq_io.exclusive(run):  # Nor within this process.
    pass
  assert not run.exists()  # Holding a folder writes nothing into it.
  with open(haq_io.lock_path(run)) as other:
    with pytest.raises(BlockingIOError):
      fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    haq_io.release(run)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_exclusive_waits_for_the_holder(tmp_path):
  run, entered = tmp_path / "fp32", []

  def second():
    with haq_io.exclusive(run):
      entered.append(time.monotonic())

  held = hold_folder(run)
  thread = threading.Thread(target=second)
  thread.start()
  time.sleep(0.3)
  assert not entered  # Still waiting.
  released = time.monotonic()
  held.close()
  thread.join(10)
  assert entered and entered[0] >= released
  with haq_io.exclusive(run, wait=False):  # Given back after the block.
    pass
