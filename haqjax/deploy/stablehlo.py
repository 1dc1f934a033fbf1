"""Serialized StableHLO of a jitted function (`model.stablehlo`).

`jax.export` lowers a jitted function to StableHLO with its input shapes and
dtypes and serializes it (with a version of the calling convention) to bytes
that a later JAX, or any StableHLO consumer, loads without the Python that
built it. For an integer engine the int8 convolutions with int32 accumulation
and the fixed-point requantization are in the module, so the reloaded
function gives the same integers::

    size = save_stablehlo(path, jax.jit(run), images)
    run_again = load_stablehlo(path)      # callable: run_again(images)

Shapes are fixed by the example arguments, except the leading (batch) axis of
the first argument when `symbolic_batch` is set: the module then takes any
batch size. The module is lowered for `platforms` (by default the current
backend); ('cpu', 'cuda') gives one file that runs on either.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
from jax import export

from haqjax.io import atomic_open


def _spec(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def export_function(fn: Callable[..., Any], *args: Any,
                    platforms: Sequence[str] | None = None,
                    symbolic_batch: bool = False) -> export.Exported:
  """Lowers `fn` at the shapes and dtypes of `args` with `jax.export`.

  Args:
    fn: a function of arrays (jitted or not; it is jitted here if not).
    *args: example arguments (pytrees of arrays or `jax.ShapeDtypeStruct`s):
      only their shapes and dtypes are used.
    platforms: lower for these platforms ('cpu', 'cuda', 'tpu'); None: the
      default backend.
    symbolic_batch: the leading axis of each array in the first argument is
      a symbolic dimension 'b', so any batch size runs.

  Returns:
    The `jax.export.Exported`; `.serialize()` gives its bytes.

  Raises:
    ValueError: `symbolic_batch` without a first argument, or with a scalar
      in it.
  """
  specs = [jax.tree.map(_spec, a) for a in args]
  if symbolic_batch:
    if not specs:
      raise ValueError("symbolic_batch is True with no arguments; allowed: a first "
                       "argument whose arrays have a leading batch axis")
    (batch,) = export.symbolic_shape("b")

    def batched(s):
      if not s.shape:
        raise ValueError(f"symbolic_batch is True and the first argument holds a "
                         f"scalar {s}; allowed: arrays with a leading batch axis")
      return jax.ShapeDtypeStruct((batch, *s.shape[1:]), s.dtype)

    specs[0] = jax.tree.map(batched, specs[0])
  if not hasattr(fn, "lower"):
    fn = jax.jit(fn)
  kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
  return export.export(fn, **kwargs)(*specs)


def save_stablehlo(path: str | os.PathLike, fn: Callable[..., Any], *args: Any,
                   platforms: Sequence[str] | None = None,
                   symbolic_batch: bool = False) -> int:
  """Exports `fn` (see `export_function`) and writes it to `path` atomically.

  Returns:
    The file's size in bytes.
  """
  data = export_function(fn, *args, platforms=platforms,
                         symbolic_batch=symbolic_batch).serialize()
  with atomic_open(path, "wb") as f:
    f.write(data)
  return len(data)


def load_exported(path: str | os.PathLike) -> export.Exported:
  """The `jax.export.Exported` in a file written by `save_stablehlo`."""
  with open(path, "rb") as f:
    return export.deserialize(bytearray(f.read()))


def load_stablehlo(path: str | os.PathLike) -> Callable[..., Any]:
  """A callable that runs the function saved at `path` (its `Exported.call`)."""
  return load_exported(path).call
