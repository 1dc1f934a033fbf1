"""Metric writers: one interface, JSON-lines and TensorBoard back-ends.

Only process 0 writes; `create_writer` returns a writer that drops everything
on the other processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from haqjax import io as haq_io
from haqjax.io import read_jsonl  # noqa: F401  Re-exported: readers of metrics files.

Scalars = Mapping[str, Any]


class MetricWriter(Protocol):
  """Where training and search metrics go."""

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    """Records `scalars` (name -> number) at `step`."""

  def flush(self) -> None:
    """Makes everything written so far durable."""

  def close(self) -> None:
    """Flushes and releases the writer."""


def _to_float(value: Any) -> float:
  return float(np.asarray(value))


class JsonlWriter:
  """Appends one JSON object per `write_scalars` call: {"step", "time", ...}.

  Each call appends its line at once (`haqjax.io.append_jsonl`), so a
  process that dies loses none; a line torn by a crash stays on its own line
  and later records stay whole.
  """

  def __init__(self, path: str | os.PathLike):
    self._path = os.fspath(path)
    haq_io.append_jsonl(self._path, [])  # Creates it; ends a torn last line.

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: _to_float(v) for k, v in scalars.items()})
    haq_io.append_jsonl(self._path, [record])

  def flush(self) -> None:
    with open(self._path, "ab") as f:
      os.fsync(f.fileno())

  def close(self) -> None:
    self.flush()


class TensorBoardWriter:
  """TensorBoard event files through tensorboardX (no TensorFlow needed)."""

  def __init__(self, logdir: str | os.PathLike):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(os.fspath(logdir))

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    for k, v in scalars.items():
      self._writer.add_scalar(k, _to_float(v), int(step))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiWriter:
  """Sends every call to each of `writers`."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = list(writers)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    for w in self._writers:
      w.write_scalars(step, scalars)

  def flush(self) -> None:
    for w in self._writers:
      w.flush()

  def close(self) -> None:
    for w in self._writers:
      w.close()


def create_writer(workdir: str | os.PathLike, *, tensorboard: bool = True,
                  name: str = "metrics") -> MetricWriter:
  """`<workdir>/<name>.jsonl` (+ `<workdir>/tensorboard/`) on process 0."""
  if jax.process_index() != 0:
    return MultiWriter([])
  writers: list[MetricWriter] = [JsonlWriter(os.path.join(workdir, f"{name}.jsonl"))]
  if tensorboard:
    writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
  return MultiWriter(writers)
