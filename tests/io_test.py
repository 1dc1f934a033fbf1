"""Tests of the atomic JSON and JSON-lines helpers."""

import json
import math
import os

import pytest

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
