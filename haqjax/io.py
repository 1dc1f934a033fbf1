"""Small file helpers: atomic writes so that no result is ever half-written.

JSON files (`write_json`) and JSON-lines files (`write_jsonl`, `append_jsonl`,
`read_jsonl`: one JSON object per line, e.g. metrics or search records) are
written here, so every writer and reader agrees on the format and on what a
crash leaves behind: a replaced file is whole or untouched, and a line torn
by a crash while appending is skipped on reading.

A run's folder belongs to one process at a time (`claim`, `exclusive`): a
second run started with the same folder on the same machine stops at once,
naming the first, instead of writing the same checkpoints and results.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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


class Busy(ValueError):
  """A run's folder is held by another process."""


# Folders this process holds until it exits: lock file path -> open file.
_HELD: dict[str, IO[Any]] = {}


def lock_path(directory: str | os.PathLike, part: str = "") -> str:
  """The lock file of `directory` (and of `part` of it, e.g. one host's share).

  It lies in the temporary folder, named by a hash of the folder's real path,
  so that holding a folder writes nothing into it (a run refused for a bad
  flag leaves no folder behind).
  """
  key = f"{os.path.realpath(os.fspath(directory))}\0{part}"
  name = hashlib.sha256(key.encode()).hexdigest()[:24]
  return os.path.join(tempfile.gettempdir(), "haqjax-locks", f"{name}.lock")


def _acquire(directory: str | os.PathLike, part: str, wait: bool) -> IO[Any]:
  path = lock_path(directory, part)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  f = open(path, "a+")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "a process"
    f.close()
    raise Busy(f"workdir={os.fspath(directory)} is in use by another run ({holder}); "
               "allowed: one run per folder at a time (wait for it to end, or pick "
               "another folder)") from None
  except BaseException:
    f.close()
    raise
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()}")
  f.flush()
  return f


def claim(directory: str | os.PathLike, part: str = "") -> None:
  """Holds `directory` for this process until it exits (however it exits).

  Claiming a folder this process holds again does nothing.

  Args:
    directory: a run's folder; it need not exist.
    part: what of it is held, where several processes share a folder (a
      multi-host job's process index); by default the whole folder.

  Raises:
    Busy: another process holds it (its message names the process).
  """
  path = lock_path(directory, part)
  if path not in _HELD:
    _HELD[path] = _acquire(directory, part, wait=False)


def release(directory: str | os.PathLike, part: str = "") -> None:
  """Gives up a `claim` (the process's end does too)."""
  f = _HELD.pop(lock_path(directory, part), None)
  if f is not None:
    f.close()


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, *, wait: bool = True) -> Iterator[None]:
  """Holds `directory` within the block, waiting for another holder by default.

  For a stage that several runs share (one FP32 model that two comparisons
  start from): the second waits, then finds the first's result.
  """
  path = lock_path(directory)
  if path in _HELD:  # This process holds it already.
    yield
    return
  f = _acquire(directory, "", wait=wait)
  try:
    yield
  finally:
    f.close()
