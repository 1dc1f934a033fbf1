"""Batches of a split: shuffled per (seed, epoch), padded, optionally sharded.

::

    splits = haqjax.data.load("cifar10")
    for epoch in range(num_epochs):
      for batch in haqjax.data.batches(splits.train, batch_size=128, seed=0,
                                       epoch=epoch, shuffle=True,
                                       drop_remainder=True, augment=True):
        state, metrics = train_step(state, batch)

    for batch in haqjax.data.batches(splits.test, batch_size=512,
                                     shuffle=False, drop_remainder=False,
                                     sharding=data_sharding):
      ...  # All batches have one shape; weigh each example by batch["mask"].

A batch is `{"image": float32 [B, H, W, C], "label": int32 [B],
"mask": float32 [B]}`, images normalised with the spec's mean and std. The
order of the examples is a function of `(seed, epoch)` only, and so are the
augmentations (see `haqjax.data.transforms`). With `drop_remainder=False` the
last batch is padded to `batch_size` with zero images, label 0 and mask 0, so
evaluation compiles once and shards evenly.

With a `sharding` (a `NamedSharding` whose first partition axis splits the
batch) a batch is made of global `jax.Array`s; each process reads and decodes
only the rows of the global batch that its own devices hold, and
`jax.make_array_from_process_local_data` assembles them. Without one, a batch
is numpy arrays and every process reads the whole batch.
"""

from __future__ import annotations

import numbers
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np

from haqjax.data import splits as splits_lib
from haqjax.data import transforms

Batch = dict[str, np.ndarray | jax.Array]


def _check_int(field: str, value, minimum: int) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum):
    raise ValueError(f"{field} is {value!r}; allowed: an int >= {minimum}")
  return int(value)


def num_batches(split: splits_lib.Split | int, batch_size: int,
                drop_remainder: bool) -> int:
  """Number of batches `batches` yields for one pass over `split`.

  Args:
    split: a split, or its number of examples.
    batch_size: examples per batch (global, over all processes).
    drop_remainder: whether a last, partial batch is dropped (else padded).
  """
  size = split if isinstance(split, numbers.Integral) else len(split)
  batch_size = _check_int("batch_size", batch_size, 1)
  return size // batch_size if drop_remainder else -(-size // batch_size)


def steps_per_epoch(split: splits_lib.Split | int, batch_size: int) -> int:
  """Training steps per epoch: full batches of `split` (remainder dropped)."""
  return num_batches(split, batch_size, drop_remainder=True)


def _batch_axis_shards(sharding: jax.sharding.NamedSharding) -> int:
  """Into how many pieces `sharding` splits the first axis."""
  spec = sharding.spec
  first = spec[0] if len(spec) else None
  if first is None:
    return 1
  names = first if isinstance(first, tuple) else (first,)
  return int(np.prod([sharding.mesh.shape[n] for n in names]))


def _local_rows(sharding: jax.sharding.NamedSharding,
                global_shape: tuple[int, ...]) -> np.ndarray:
  """Rows of the global batch held by this process's devices, ascending.

  `make_array_from_process_local_data` expects them in this order: the
  devices' row ranges, de-duplicated, sorted and concatenated.
  """
  ranges = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    start, stop, step = index[0].indices(global_shape[0])
    if step != 1:
      raise ValueError(f"sharding {sharding} strides the batch axis; allowed: "
                       "contiguous row blocks per device")
    ranges.add((start, stop))
  return np.concatenate([np.arange(a, b) for a, b in sorted(ranges)])


def _prefetch(iterator: Iterator[Batch], size: int) -> Iterator[Batch]:
  """Runs `iterator` on a background thread, up to `size` items ahead."""
  items = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not put((item, None)):
          return
      put((done, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((None, e))  # Re-raised in the consumer.

  thread = threading.Thread(target=produce, name="haqjax-prefetch",
                            daemon=True)
  thread.start()
  try:
    while True:
      item, error = items.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()


def batches(split: splits_lib.Split, *, batch_size: int, seed: int = 0,
            epoch: int = 0, shuffle: bool, drop_remainder: bool,
            augment: bool = False,
            sharding: jax.sharding.NamedSharding | None = None,
            prefetch: int | None = None, start: int = 0) -> Iterator[Batch]:
  """Iterates over one epoch of `split` in batches.

  Args:
    split: the split, e.g. `load("cifar10").train`.
    batch_size: examples per batch, global over all processes.
    seed: data seed; with `epoch`, fixes the order and the augmentations.
    epoch: the epoch; each epoch has its own order.
    shuffle: whether to shuffle (else the split's order).
    drop_remainder: whether to drop a last, partial batch (training) or pad
      it with mask-0 examples (evaluation).
    augment: whether to apply the dataset's training augmentation
      (`split.spec.augmentation`; "none" for digits and Fashion-MNIST).
      For ImageNet `False` means the evaluation centre crop.
    sharding: a `NamedSharding` for the image batch whose first partition
      axis splits the batch; labels and masks get the same first axis. None:
      numpy arrays of the whole batch.
    prefetch: batches prepared ahead on a background thread; default 1 for
      streamed datasets (ImageNet), 0 for in-memory ones.
    start: index of the first batch to yield. A run resumed in the middle of
      an epoch passes the number of batches it already took, and gets the
      rest of the epoch without reading the skipped examples.

  Returns:
    An iterator of `{"image": float32 [B, H, W, C], "label": int32 [B],
    "mask": float32 [B]}`, `num_batches(split, batch_size, drop_remainder)`
    of them (less `start`).

  Raises:
    ValueError: for an invalid argument, or `drop_remainder=True` with fewer
      examples than `batch_size` (an epoch without batches).
  """
  batch_size = _check_int("batch_size", batch_size, 1)
  seed = _check_int("seed", seed, 0)
  epoch = _check_int("epoch", epoch, 0)
  start = _check_int("start", start, 0)
  size = len(split)
  if drop_remainder and 0 < size < batch_size:
    raise ValueError(
        f"batch_size is {batch_size} with drop_remainder=True, but split "
        f"{split.name!r} has {size} examples; allowed: batch_size <= {size}, "
        "or drop_remainder=False")
  prefetch = (0 if split.in_memory else 1) if prefetch is None else prefetch
  prefetch = _check_int("prefetch", prefetch, 0)

  image_shape = (batch_size,) + split.spec.image_shape
  if sharding is None:
    rows = np.arange(batch_size)
    shardings = None
  else:
    if not isinstance(sharding, jax.sharding.NamedSharding):
      raise ValueError(f"sharding is {sharding!r}; allowed: a "
                       "jax.sharding.NamedSharding whose first axis splits "
                       "the batch")
    shards = _batch_axis_shards(sharding)
    if batch_size % shards:
      raise ValueError(
          f"batch_size is {batch_size}; allowed: a multiple of {shards}, the "
          "number of pieces the sharding splits the batch into")
    first = sharding.spec[0] if len(sharding.spec) else None
    vector = jax.sharding.NamedSharding(sharding.mesh,
                                        jax.sharding.PartitionSpec(first))
    shardings = {"image": sharding, "label": vector, "mask": vector}
    rows = _local_rows(sharding, image_shape)

  if shuffle:
    order = np.random.default_rng(
        [transforms.SHUFFLE_TAG, seed, epoch]).permutation(size)
  else:
    order = np.arange(size)
  count = num_batches(size, batch_size, drop_remainder)
  mean, std = split.spec.mean, split.spec.std

  def generate() -> Iterator[Batch]:
    for b in range(start, count):
      positions = order[b * batch_size:(b + 1) * batch_size]
      valid = rows < len(positions)  # [local B]; a prefix, rows ascending.
      images, labels = split.load(positions[rows[valid]], augment=augment,
                                  seed=seed, epoch=epoch)
      batch = {
          "image": np.zeros((len(rows),) + split.spec.image_shape, np.float32),
          "label": np.zeros((len(rows),), np.int32),
          "mask": valid.astype(np.float32),
      }
      transforms.normalize(images, mean, std, out=batch["image"][:len(labels)])
      batch["label"][:len(labels)] = labels
      if shardings is not None:
        batch = {
            key: jax.make_array_from_process_local_data(
                shardings[key], value, (batch_size,) + value.shape[1:])
            for key, value in batch.items()
        }
      yield batch

  return _prefetch(generate(), prefetch) if prefetch else generate()
