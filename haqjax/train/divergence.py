"""Divergence checks: a run whose loss or state stops being finite ends cleanly.

A run that diverges (a learning rate too high, or NaN) would otherwise train
on NaNs to the end, report chance accuracy and exit 0, and its checkpoints
would hold NaNs. The trainer instead checks the metrics it already fetches
at its log points and epoch ends (the loss, and the gradient norm, which
overflows first; no extra host sync per step) and the state before each
checkpoint, so a checkpoint always holds a finite state; on
divergence it raises `Diverged`, a `ValueError` whose one-line message names
the step and the last good checkpoint, which the launcher prints as its
one-line error (exit code 2).

Example:

  window = jax.device_get(metrics_of_each_step)  # Steps step-n+1..step.
  check_metrics(window, step, last_checkpoint)
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import os

import jax
import jax.numpy as jnp
import numpy as np

from haqjax.typing import Array
from haqjax.typing import ArrayLike
from haqjax.typing import PyTree


class Diverged(ValueError):
  """A non-finite loss or state; the message names the step and the last good checkpoint.

  Attributes:
    member: in a job of stacked members (`haqjax.train.members`), the index
      of the member that diverged; None otherwise.
  """

  def __init__(self, message: str, member: int | None = None):
    super().__init__(message)
    self.member = member


def _kept(last_checkpoint: str | os.PathLike | None) -> str:
  if last_checkpoint is None:
    return "no checkpoint was written before it"
  return f"the last good checkpoint {os.fspath(last_checkpoint)} is kept"


def check_finite(loss: ArrayLike, step: int,
                 last_checkpoint: str | os.PathLike | None, *, name: str = "loss") -> None:
  """Raises `Diverged` when a loss is NaN or infinite.

  Args:
    loss: the loss of `step`, or the losses of consecutive steps ending at
      `step` (`[n]`: steps `step - n + 1 .. step`).
    step: the step of the last loss.
    last_checkpoint: the newest checkpoint's path (None: none yet), named in
      the message so that the user knows what survives.
    name: what `loss` is, for the message (e.g. 'grad_norm').

  Raises:
    Diverged: naming the first step whose loss is not finite.
  """
  losses = np.asarray(loss, np.float64).reshape(-1)  # [n]
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    first = step - losses.size + 1 + int(bad[0])
    raise Diverged(f"training diverged: {name} is {losses[bad[0]]} at step {first}; "
                   f"{_kept(last_checkpoint)}")


def check_metrics(window: Sequence[Mapping[str, ArrayLike]], step: int,
                  last_checkpoint: str | os.PathLike | None) -> None:
  """`check_finite` on every scalar metric of consecutive steps ending at `step`.

  Args:
    window: one dict of scalars per step, steps `step - len(window) + 1 ..
      step` (fetched to the host).
    step: the step of the last dict.
    last_checkpoint: as in `check_finite`.

  Raises:
    Diverged: naming the first step with a non-finite metric, and the metric.
  """
  for i, metrics in enumerate(window):
    for name in sorted(metrics, key=lambda n: n != "loss"):  # The loss first.
      check_finite(metrics[name], step - len(window) + 1 + i, last_checkpoint, name=name)


@jax.jit
def all_finite(tree: PyTree) -> Array:
  """Whether every floating-point leaf of `tree` is finite (a bool scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def check_state_finite(state: PyTree, step: int,
                       last_checkpoint: str | os.PathLike | None) -> None:
  """Raises `Diverged` when `state` (after `step`) holds a NaN or an infinity.

  Called before a checkpoint is written, so that no checkpoint holds one.
  The message names the first non-finite leaf (e.g. a BN running variance,
  which can overflow while the training loss, on batch statistics, stays
  finite).
  """
  if bool(all_finite(state)):
    return
  leaf = next(
      (jax.tree_util.keystr(path, simple=True, separator="/")
       for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
       if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
       and not np.all(np.isfinite(jax.device_get(x)))), "a leaf")
  raise Diverged(f"training diverged: the state is not finite after step {step} "
                 f"({leaf}); {_kept(last_checkpoint)}")
