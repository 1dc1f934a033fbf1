"""Data parallelism over every device with `jax.sharding`, single or multi host.

The batch axis is split over a 1-D mesh named 'data'; parameters and optimizer
state are replicated. XLA inserts the gradient all-reduce, so the training
step itself is written for one device.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from haqjax.typing import PyTree

DATA_AXIS = "data"


def initialize_multihost() -> None:
  """Joins the multi-host job (coordinator, process id and count from the
  environment, as `jax.distributed.initialize` reads them on TPU pods, SLURM
  and Open MPI)."""
  jax.distributed.initialize()


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (global) devices, axis name 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of `tree` on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_size(field: str, batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{field}={batch_size} is not divisible by the {n} devices; "
                     f"use a multiple of {n}")
