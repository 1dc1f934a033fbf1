"""`train_and_evaluate(config, workdir)`: FP32 training and QAT, resumable.

The workdir holds everything a run writes:

  config.json        the config (a rerun must match it, see `check_workdir`)
  layers.json        the model's layer table
  policy.json        the policy (QAT)
  metrics.jsonl      training/eval scalars (JSON lines), tensorboard/ beside it
  checkpoints/       orbax checkpoints; a rerun resumes from the latest
  results.json       final metrics, written last and atomically

Data order depends only on (seed, epoch), so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from haqjax import data as haq_data
from haqjax import io as haq_io
from haqjax import models as haq_models
from haqjax import parallel
from haqjax import quant
from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn import LayerTable
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.policy import load_policy
from haqjax.policy import save_policy
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import divergence
from haqjax.train import steps
from haqjax.train import writers
from haqjax.train.config import Config

# Quantizer parameters (a matmul of two activations has its second operand's
# `rhs_quant`), which an FP32 model entering QAT lacks.
_QUANT_PARAMS = ("weight_quant", "act_quant", "rhs_quant")
QUANT_STREAM = 1  # Folded into the seed's key for the `quant` RNG stream.

# Fields that may differ between a run and its resumption.
_RESUMABLE_CHANGES = frozenset({
    "data_dir", "manual_dir", "eval_batch_size", "log_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "progress", "tensorboard"})


def resolve_policy(config: Config, table: LayerTable) -> Policy | None:
  """The policy a config asks for, validated against the model's table."""
  if config.mode not in ("qat", "ptq"):
    return None
  bits = config.uniform_bits()
  if bits is not None:
    policy = Policy.uniform(table.names, *bits)
  else:
    policy = load_policy(config.policy, table.names)
  if config.first_layer_w8 or config.last_layer_w8a8:
    policy = quant.haq_convention(policy, first=config.first_layer_w8,
                                  last=config.last_layer_w8a8)
  return policy


def build_model(config: Config, num_classes: int):
  kwargs: dict[str, Any] = {"dtype": jnp.dtype(config.dtype)}
  if config.width_mult != 1.0:
    kwargs["width_mult"] = config.width_mult
  if config.mode == "qat":
    kwargs["quant_scheme"] = quant.QuantScheme(
        weight=quant.weight_quantizer(config.weight_quantizer),
        act=quant.act_quantizer(config.act_quantizer))
    kwargs["fold_bn"] = config.fold_bn
    kwargs["freeze_bn_stats"] = config.freeze_bn_stats
  return haq_models.create(config.model, num_classes=num_classes, **kwargs)


def check_workdir(config: Config, workdir: str) -> None:
  """Refuses to resume a workdir that holds a different run."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    saved = Config.load(path).to_dict()
  except (ValueError, TypeError) as e:
    raise ValueError(f"workdir {workdir!r}: config.json cannot be read ({e}); "
                     "use another --workdir") from None
  for key, value in config.to_dict().items():
    if key not in _RESUMABLE_CHANGES and saved.get(key) != value:
      raise ValueError(
          f"workdir {workdir!r} holds a run with {key}={saved.get(key)!r}, not "
          f"{value!r}; use another --workdir to keep both")


def _init_from(config: Config, state: steps.TrainState, tx) -> steps.TrainState:
  """Takes params and batch_stats from another run; a fresh optimizer state."""
  variables = ckpt_lib.restore_variables(config.init_from)
  return merge_variables(state, variables, tx, source=f"init_from={config.init_from!r}",
                         model=config.model)


def merge_variables(state: steps.TrainState, variables: dict[str, Any], tx, *,
                    source: str, model: str) -> steps.TrainState:
  """`state` with `variables`' params and batch_stats and a fresh optimizer.

  Quantizer parameters missing from `variables` (an FP32 model entering QAT)
  keep their values in `state`; anything else missing or mis-shaped is a
  one-line `ValueError` naming `source`.
  """
  merged = {}
  for field in ("params", "batch_stats"):
    want = jax.tree_util.tree_flatten_with_path(getattr(state, field))
    got = {jax.tree_util.keystr(k): v
           for k, v in jax.tree_util.tree_flatten_with_path(variables[field])[0]}
    leaves = []
    for path, init_value in want[0]:
      name = jax.tree_util.keystr(path)
      # Quantizer parameters are new in a QAT run: they keep their init.
      new_quant = any(getattr(p, "key", None) in _QUANT_PARAMS for p in path)
      value = got.pop(name, None)
      if value is None and not new_quant:
        raise ValueError(f"{source}: its {field} do not fit "
                         f"model {model!r} (missing {name})")
      if value is not None and np.shape(value) != np.shape(init_value):
        raise ValueError(f"{source}: its {field} do not fit "
                         f"model {model!r} (shape of {name})")
      leaves.append(init_value if value is None else jnp.asarray(value))
    extra = [k for k in got if not any(q in k for q in _QUANT_PARAMS)]
    if extra:
      raise ValueError(f"{source}: its {field} do not fit model "
                       f"{model!r} (unexpected {extra[0]})")
    merged[field] = jax.tree_util.tree_unflatten(want[1], leaves)
  return state.replace(params=merged["params"], batch_stats=merged["batch_stats"],
                       opt_state=tx.init(merged["params"]))


def _calibrate(config: Config, model, state: steps.TrainState, splits, policy,
               tx) -> steps.TrainState:
  """Sets quantizer parameters from a few training batches (before QAT)."""
  batches = itertools.islice(
      haq_data.batches(splits.train, batch_size=config.batch_size, seed=config.seed,
                       epoch=0, shuffle=True, drop_remainder=False),
      config.calibration_batches)
  variables = calibrate_lib.calibrate(model, state.variables(), batches, policy)
  return state.replace(params=variables["params"], opt_state=tx.init(variables["params"]))


def _check_finite(running: list[dict[str, Any]], state: steps.TrainState, step: int,
                  last_checkpoint: str | None) -> None:
  """Before a checkpoint: the metrics not yet logged and `state` are finite.

  Raises:
    divergence.Diverged: naming the step and `last_checkpoint`.
  """
  divergence.check_metrics(jax.device_get(running), step, last_checkpoint)
  divergence.check_state_finite(state, step, last_checkpoint)


class Evaluator:
  """Compiled-once evaluation over a split (padded last batch, masked)."""

  def __init__(self, model, sharding, batch_size: int):
    self.traces = 0  # How often the step was traced (1 for every policy).

    def step(variables, batch, policy, index):
      self.traces += 1
      return steps.eval_step(model, variables, batch, policy, index)

    self._step = jax.jit(step)
    self._sharding = sharding
    self._batch_size = batch_size

  def __call__(self, variables, split, policy) -> dict[str, float]:
    sums = None
    for index, batch in enumerate(haq_data.batches(
        split, batch_size=self._batch_size, seed=0, epoch=0, shuffle=False,
        drop_remainder=False, sharding=self._sharding)):
      out = self._step(variables, batch, policy, index)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
      return {}
    return steps.summarize_eval(jax.device_get(sums))


def schedule_and_optimizer(config: Config, steps_per_epoch: int
                           ) -> tuple[int, optax.Schedule, optax.GradientTransformation]:
  """`(total_steps, schedule, tx)` of `config`'s training at `steps_per_epoch`."""
  total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
  schedule = steps.make_schedule(
      name=config.schedule, peak=config.learning_rate, total_steps=total_steps,
      warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)))
  tx = steps.make_optimizer(name=config.optimizer, learning_rate=schedule,
                            momentum=config.momentum, weight_decay=config.weight_decay)
  return total_steps, schedule, tx


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Trains (FP32) or fine-tunes (QAT) a model and evaluates it.

  Args:
    config: what to run.
    workdir: where everything is written; a rerun with the same workdir and
      config resumes from the latest checkpoint.

  Returns:
    The final metrics, as written to `results.json`.

  Raises:
    ValueError: for a bad config, missing data, a policy that does not fit
      the model, a workdir holding another run or an unreadable checkpoint.
  """
  if config.mode == "ptq":
    raise ValueError("mode is 'ptq'; train_and_evaluate runs 'train' and 'qat' "
                     "(haqjax.ptq.runner.ptq_and_evaluate runs 'ptq')")
  workdir = os.path.abspath(workdir)
  primary = jax.process_index() == 0
  check_workdir(config, workdir)

  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         manual_dir=config.manual_dir, val_size=config.val_size,
                         split_seed=config.split_seed)
  spec = splits.spec
  model = build_model(config, spec.num_classes)
  input_shape = (1, *spec.image_shape)
  table = layer_table(model, input_shape)
  policy = resolve_policy(config, table)

  mesh = parallel.data_mesh()
  parallel.check_batch_size("batch_size", config.batch_size, mesh)
  parallel.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
  data_sharding = parallel.batch_sharding(mesh)

  steps_per_epoch = haq_data.num_batches(splits.train, config.batch_size,
                                         drop_remainder=True)
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={config.batch_size} is larger than the training "
                     f"split ({len(splits.train)} examples)")
  total_steps, schedule, tx = schedule_and_optimizer(config, steps_per_epoch)

  key = jax.random.key(config.seed)
  state = steps.init_state(key, model, tx, input_shape)
  # Base key of the `quant` stream (stochastic rounding), apart from init's.
  quant_key = jax.random.fold_in(key, QUANT_STREAM)
  if config.init_from:
    state = _init_from(config, state, tx)

  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  if checkpointer.latest_step() is not None:
    state, _ = checkpointer.restore(parallel.replicate(state, mesh))
  elif policy is not None:
    state = _calibrate(config, model, state, splits, policy, tx)
  state = parallel.replicate(state, mesh)
  start_step = int(state.step)
  last_checkpoint = checkpointer.path(start_step) if start_step else None

  if primary:
    config.save(os.path.join(workdir, "config.json"))
    haq_io.write_json(os.path.join(workdir, "layers.json"), table.rows())
    if policy is not None:
      save_policy(os.path.join(workdir, "policy.json"), policy, model=config.model)
  writer = writers.create_writer(workdir, tensorboard=config.tensorboard)

  train_step = jax.jit(
      functools.partial(steps.train_step, model, tx,
                        label_smoothing=config.label_smoothing, key=quant_key),
      donate_argnums=0)
  evaluate = Evaluator(model, data_sharding, config.eval_batch_size)

  show = config.progress if config.progress is not None else os.isatty(2)
  bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not (show and primary),
                  desc=f"{config.mode} {config.model}", unit="step", dynamic_ncols=True)
  step = start_step
  first_step_seconds, loop_start, eval_seconds, running = None, None, 0.0, []
  val: dict[str, float] = {}
  try:
    while step < total_steps:
      epoch, skip = divmod(step, steps_per_epoch)
      for batch in haq_data.batches(
          splits.train, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
          shuffle=True, drop_remainder=True, augment=config.augment,
          sharding=data_sharding, start=skip):
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch, policy)
        running.append(metrics)
        step += 1
        bar.update(1)
        if first_step_seconds is None:
          jax.block_until_ready(metrics)
          loop_start = time.perf_counter()
          first_step_seconds = loop_start - t0
        if step % config.log_every_steps == 0 or step == total_steps:
          fetched = jax.device_get(running)  # One transfer for the whole window.
          divergence.check_metrics(fetched, step, last_checkpoint)
          means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
          means["lr"] = float(schedule(step - 1))
          writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
          bar.set_postfix(loss=f"{means['loss']:.3f}", top1=f"{100 * means['top1']:.1f}")
          running = []
        if step == total_steps or step % steps_per_epoch == 0:
          break  # The epoch-end checkpoint below covers this step.
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          _check_finite(running, state, step, last_checkpoint)
          checkpointer.save(step, state, {"epoch": epoch})
          last_checkpoint = checkpointer.path(step)
      _check_finite(running, state, step, last_checkpoint)
      t_eval = time.perf_counter()
      if len(splits.val):
        val = evaluate(state.variables(), splits.val, policy)
        writer.write_scalars(step, {f"val/{k}": v for k, v in val.items() if k != "count"})
      writer.write_scalars(step, {"epoch": step / steps_per_epoch})
      writer.flush()
      checkpointer.save(step, state, {"epoch": epoch})
      last_checkpoint = checkpointer.path(step)
      eval_seconds += time.perf_counter() - t_eval
    jax.block_until_ready(state)
  except divergence.Diverged:
    writer.close()  # What was logged before the divergence stays.
    raise
  finally:
    bar.close()
    checkpointer.wait()
  timed_steps = step - start_step - 1
  train_seconds = (time.perf_counter() - loop_start - eval_seconds
                   if loop_start is not None else 0.0)

  if not val and len(splits.val):  # A rerun of a finished run trains nothing.
    val = evaluate(state.variables(), splits.val, policy)
  test = evaluate(state.variables(), splits.test, policy)
  writer.write_scalars(step, {f"test/{k}": v for k, v in test.items() if k != "count"})
  writer.close()
  checkpointer.close()
  results = {
      "mode": config.mode, "model": config.model, "dataset": config.dataset,
      "policy": None if policy is None else policy.to_dict()["layers"],
      "weight_quantizer": config.weight_quantizer if policy is not None else None,
      "act_quantizer": config.act_quantizer if policy is not None else None,
      "steps": step, "epochs": step / steps_per_epoch,
      "test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
      "val_top1": val.get("top1"), "val_loss": val.get("loss"),
      "first_step_seconds": first_step_seconds,
      "train_seconds": train_seconds,
      "train_images_per_second": (timed_steps * config.batch_size / train_seconds
                                  if timed_steps > 0 and train_seconds > 0 else None),
      "devices": jax.device_count(),
  }
  if primary:
    haq_io.write_json(os.path.join(workdir, "results.json"), results)
  return results
