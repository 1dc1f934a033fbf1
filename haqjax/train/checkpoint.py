"""Checkpoints with orbax `CheckpointManager`: save, resume, initialise from.

A checkpoint holds a state pytree and a small JSON metadata dict (epoch, the
position inside it, the policy). Checkpoints are never deleted beyond the
manager's `max_to_keep`, and a checkpoint that cannot be read is reported as a
one-line `ValueError`, never silently replaced.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from haqjax.typing import PyTree

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """The checkpoint folder of a workdir (a checkpoints/ path is kept as is)."""
  path = os.path.abspath(os.fspath(workdir))
  if os.path.basename(path.rstrip("/")) == CHECKPOINT_DIR:
    return path
  return os.path.join(path, CHECKPOINT_DIR)


class Checkpointer:
  """Saves and restores `(state, metadata)` under `<workdir>/checkpoints/`."""

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
               create: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def path(self, step: int) -> str:
    """The folder of the checkpoint of `step`."""
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: PyTree, metadata: dict[str, Any]) -> None:
    """Saves asynchronously; `wait()` or the next save makes it durable."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, state_like: PyTree | None = None,
              step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Restores `step` (default: latest) shaped and sharded like `state_like`.

    Raises:
      ValueError: no checkpoint, or one that cannot be read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {self.directory}")
    if state_like is None:
      state_args = ocp.args.StandardRestore()
    else:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
      state_args = ocp.args.StandardRestore(abstract)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=state_args, meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable data.
      reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      raise ValueError(
          f"checkpoint {os.path.join(self.directory, str(step))} cannot be read "
          f"({reason}); move it away to start over, or point --workdir elsewhere"
      ) from None
    return restored["state"], dict(restored["meta"] or {})

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_variables(workdir: str | os.PathLike) -> dict[str, Any]:
  """The `params` and `batch_stats` of the latest checkpoint in `workdir`.

  Used to start a QAT run from an FP32 run. Raises a one-line `ValueError`
  when there is no readable checkpoint.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise ValueError(f"init_from={os.fspath(workdir)!r}: no checkpoint folder at {directory}")
  ckpt = Checkpointer(directory, create=False)
  try:
    state, _ = ckpt.restore()
  finally:
    ckpt.close()
  missing = {"params", "batch_stats"} - set(state)
  if missing:
    raise ValueError(f"init_from={os.fspath(workdir)!r}: checkpoint lacks {sorted(missing)}")
  return {"params": state["params"], "batch_stats": state["batch_stats"]}
