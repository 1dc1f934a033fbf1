"""Small file helpers: atomic writes so that no result is ever half-written.

JSON files (`write_json`) and JSON-lines files (`write_jsonl`, `append_jsonl`,
`read_jsonl`: one JSON object per line, e.g. metrics or search records) are
written here, so every writer and reader agrees on the format and on what a
crash leaves behind: a replaced file is whole or untouched, and a line torn
by a crash while appending is skipped on reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any, IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
  """Opens a temporary file beside `path` and renames it over `path` on success.

  On an exception the temporary file is removed and `path` is untouched.
  """
  path = os.fspath(path)
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=directory)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically."""
  with atomic_open(path) as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")


def _lines(records: Iterable[Any]) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
  """Replaces `path` with one JSON line per record, atomically.

  On an exception (also one raised while `records` is iterated) `path` keeps
  its previous content.
  """
  with atomic_open(path) as f:
    f.write(_lines(records))


def append_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
  """Appends one JSON line per record to `path`, creating it (and its folder).

  A last line torn by a crash is ended first, so that it stays a line of its
  own, which `read_jsonl` skips, and the new records stay whole.
  """
  text = _lines(records).encode()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a+b") as f:
    if f.seek(0, os.SEEK_END) > 0:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        text = b"\n" + text
    f.write(text)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
  """The records of a JSON-lines file; a line that is not JSON (torn) is skipped.

  Raises:
    FileNotFoundError: no file at `path`.
  """
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
