"""K fine-tunes as one vmapped job: members stacked on a leading axis.

Each member is a QAT run of its own: its own policy (uniform and mixed
policies run side by side), its own seed and so its own initial noise,
calibration batches, data order and `quant`/`dropout` keys. Their
`TrainState`s, policies, keys and batches are stacked on a leading `[K]`
axis, and one compiled step, `steps.train_step` under `jax.vmap`, trains all
of them; evaluation is `steps.eval_step` under `vmap` on the shared
validation and test batches. Bits and keys are arrays, so the same compiled
step serves any set of K policies and seeds.

Member k follows the standalone run (`trainer.train_and_evaluate` with
`--seed` = its seed) step for step: the same initial state, calibration,
batches, keys and learning rates. What differs is only the order of
floating-point reductions XLA picks for the batched computation, so the
figures agree to float tolerance, not bit for bit.

  states = init_members(config, model, tx, splits, policies, seeds, variables)
  fitted = fit_members(config, model, splits, states, policies, seeds, workdir)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from haqjax import data as haq_data
from haqjax.nn import calibrate as calibrate_lib
from haqjax.policy import Policy
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import divergence
from haqjax.train import steps
from haqjax.train import trainer
from haqjax.train import writers
from haqjax.train.config import Config
from haqjax.train.trainer import QUANT_STREAM
from haqjax.train.trainer import schedule_and_optimizer
from haqjax.typing import PyTree


def stack(trees: Sequence[PyTree]) -> PyTree:
  """The trees stacked leaf by leaf on a new leading axis `[K, ...]`."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree, k: int) -> PyTree:
  """Member `k` of a stacked tree."""
  return jax.tree.map(lambda x: x[k], tree)


def quant_key(seed: int) -> jax.Array:
  """A member's base key of the `quant` stream (the standalone run's)."""
  return jax.random.fold_in(jax.random.key(seed), QUANT_STREAM)


class MemberSteps:
  """The compiled-once training and evaluation steps of K stacked members.

  `traces` counts how often each step was traced: 1 for every set of
  policies and seeds of the same K and shapes.
  """

  def __init__(self, model, tx: optax.GradientTransformation, *,
               label_smoothing: float = 0.0):
    self.traces = {"train": 0, "eval": 0}

    def one_train(state, batch, policy, key):
      return steps.train_step(model, tx, state, batch, policy,
                              label_smoothing=label_smoothing, key=key)

    def train(states, batches, policies, keys):
      self.traces["train"] += 1
      return jax.vmap(one_train)(states, batches, policies, keys)

    def evaluate(variables, batch, policies, index):
      self.traces["eval"] += 1
      return jax.vmap(lambda v, p: steps.eval_step(model, v, batch, p, index))(
          variables, policies)

    self.train = jax.jit(train, donate_argnums=0)
    self._eval = jax.jit(evaluate)

  def evaluate(self, variables: PyTree, split, policies: Policy,
               batch_size: int) -> list[dict[str, float]]:
    """Every member's `steps.summarize_eval` on `split` (`[]` for an empty split)."""
    sums = None
    for index, batch in enumerate(haq_data.batches(
        split, batch_size=batch_size, seed=0, epoch=0, shuffle=False,
        drop_remainder=False)):
      out = self._eval(variables, batch, policies, index)  # Each leaf [K].
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
      return []
    sums = jax.device_get(sums)
    k = len(sums["count"])
    return [steps.summarize_eval({n: v[i] for n, v in sums.items()}) for i in range(k)]


def init_members(config: Config, model, tx: optax.GradientTransformation, splits,
                 policies: Sequence[Policy], seeds: Sequence[int],
                 variables: dict[str, Any] | None = None) -> steps.TrainState:
  """The members' initial states, stacked `[K, ...]`.

  Member k is initialised from `key(seeds[k])`, takes `variables` (the
  `init_from` run's params and batch_stats) when given, and is calibrated
  under `policies[k]` on `config.calibration_batches` training batches of
  its own seed, as a standalone run with that seed is.
  """
  input_shape = (1, *splits.spec.image_shape)
  states = []
  for seed, policy in zip(seeds, policies):
    state = steps.init_state(jax.random.key(seed), model, tx, input_shape)
    if variables is not None:
      state = trainer.merge_variables(state, variables, tx,
                                      source=f"init_from={config.init_from!r}",
                                      model=config.model)
    if policy is not None:
      batches = itertools.islice(
          haq_data.batches(splits.train, batch_size=config.batch_size, seed=seed,
                           epoch=0, shuffle=True, drop_remainder=False),
          config.calibration_batches)
      calibrated = calibrate_lib.calibrate(model, state.variables(), batches, policy)
      state = state.replace(params=calibrated["params"],
                            opt_state=tx.init(calibrated["params"]))
    states.append(state)
  # Through the host: calibration may leave arrays typed with a mesh axis, which
  # would retrace the compiled step for otherwise identical inputs.
  return jax.device_put(jax.device_get(stack(states)))


def _stacked_batches(split, config: Config, seeds: Sequence[int], epoch: int,
                     start: int):
  """The members' batches of `epoch`, each member in its own seed's order: `[K, B, ...]`."""
  iterators = [haq_data.batches(split, batch_size=config.batch_size, seed=seed,
                                epoch=epoch, shuffle=True, drop_remainder=True,
                                augment=config.augment, start=start)
               for seed in seeds]
  for group in zip(*iterators):
    yield {name: np.stack([np.asarray(b[name]) for b in group]) for name in group[0]}


def fit_members(config: Config, model, splits, states: steps.TrainState,
                policies: Policy, seeds: Sequence[int], workdir: str, *,
                member_steps: MemberSteps | None = None,
                keep_going: bool = False) -> dict[str, Any]:
  """Trains the stacked members `config.epochs` epochs, then evaluates each.

  A member diverges when one of its logged metrics, or its state before a
  checkpoint, is not finite. By default that stops the job (`Diverged`,
  naming the member). With `keep_going` the member is dropped instead: its
  lane goes on computing (the members are independent, so its NaNs reach
  no other), but it is left out of every later check, of the logged means
  and of evaluation, and the checkpoints record it (`diverged` in their
  metadata), so a resumed job drops it again; the job stops once every
  member has diverged.

  Args:
    config: the members' recipe (its `seed` is not used: `seeds` are).
    model: the model.
    states: the stacked initial states (`init_members`).
    policies: the stacked policies, `w_bits`/`a_bits` `[K, L]`.
    seeds: each member's seed: its data order and `quant`/`dropout` keys.
    workdir: the stacked checkpoints (`checkpoints/`, at every epoch's end
      and every `config.checkpoint_every_steps`; a rerun resumes from the
      latest) and `metrics.jsonl` (means over members).
    member_steps: the compiled steps (default: new ones for `model`).
    keep_going: drop a diverged member rather than stop the job.

  Returns:
    `state` (the final stacked state), `steps`, `epochs`, `val` and `test`
    (one `steps.summarize_eval` dict per member, None for a diverged one),
    `diverged` (`{k: message}` of the dropped members), `traces` and timings.

  Raises:
    divergence.Diverged: without `keep_going`, when a member diverges.
  """
  steps_per_epoch = haq_data.num_batches(splits.train, config.batch_size,
                                         drop_remainder=True)
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={config.batch_size} is larger than the training "
                     f"split ({len(splits.train)} examples)")
  total_steps, schedule, tx = schedule_and_optimizer(config, steps_per_epoch)
  member_steps = member_steps or MemberSteps(model, tx,
                                             label_smoothing=config.label_smoothing)
  keys = jnp.stack([quant_key(s) for s in seeds])  # [K]
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  diverged: dict[int, str] = {}
  if checkpointer.latest_step() is not None:
    states, meta = checkpointer.restore(states)
    diverged = {int(k): v for k, v in meta.get("diverged", {}).items()}
  step = int(states.step[0])
  last_checkpoint = checkpointer.path(step) if step else None
  writer = writers.create_writer(workdir, tensorboard=False)
  first_step_seconds, loop_start, running = None, None, []

  def drop(found: dict[int, str]) -> None:
    """Records the newly diverged members, or stops the job on one."""
    if found and not keep_going:
      k = min(found)
      raise divergence.Diverged(found[k], member=k)
    diverged.update(found)

  def save(epoch: int) -> None:
    nonlocal last_checkpoint
    drop(unfinite_members(states, seeds, step, last_checkpoint, skip=diverged))
    checkpointer.save(step, states, {"epoch": epoch, "seeds": list(seeds),
                                     "diverged": {str(k): m for k, m in diverged.items()}})
    last_checkpoint = checkpointer.path(step)

  try:
    while step < total_steps and len(diverged) < len(seeds):
      epoch, skip = divmod(step, steps_per_epoch)
      for batch in _stacked_batches(splits.train, config, seeds, epoch, skip):
        t0 = time.perf_counter()
        states, metrics = member_steps.train(states, batch, policies, keys)
        running.append(metrics)
        step += 1
        if first_step_seconds is None:
          jax.block_until_ready(metrics)
          loop_start = time.perf_counter()
          first_step_seconds = loop_start - t0
        if step % config.log_every_steps == 0 or step == total_steps:
          fetched = jax.device_get(running)  # Each leaf [K].
          running = []
          drop(diverged_members(fetched, seeds, step, last_checkpoint, skip=diverged))
          live = [k for k in range(len(seeds)) if k not in diverged]
          if not live:
            break
          means = {f"train/{n}": float(np.mean([np.asarray(m[n])[live] for m in fetched]))
                   for n in fetched[0]}
          writer.write_scalars(step, {**means, "train/lr": float(schedule(step - 1))})
        if step == total_steps or step % steps_per_epoch == 0:
          break  # The epoch-end checkpoint below covers this step.
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          save(epoch)
      if len(diverged) == len(seeds):
        break  # Nothing left to train or to keep.
      writer.flush()
      save(epoch)
    jax.block_until_ready(states)
  finally:
    checkpointer.wait()
    checkpointer.close()
  train_seconds = time.perf_counter() - loop_start if loop_start is not None else 0.0
  val, test = [], [None] * len(seeds)
  if len(diverged) < len(seeds):
    variables = states.variables()
    val = member_steps.evaluate(variables, splits.val, policies, config.eval_batch_size)
    test = member_steps.evaluate(variables, splits.test, policies, config.eval_batch_size)
  val = [None if k in diverged else v for k, v in enumerate(val)]
  test = [None if k in diverged else t for k, t in enumerate(test)]
  if any(t is not None for t in test):
    writer.write_scalars(step, {"test/top1_mean": float(np.mean(
        [t["top1"] for t in test if t is not None]))})
  writer.close()
  return {"state": states, "steps": step, "epochs": step / steps_per_epoch,
          "val": val, "test": test, "diverged": dict(sorted(diverged.items())),
          "traces": dict(member_steps.traces),
          "first_step_seconds": first_step_seconds, "train_seconds": train_seconds}


def diverged_members(fetched: Sequence[dict[str, Any]], seeds: Sequence[int], step: int,
                     last_checkpoint: str | None, skip: Collection[int] = ()
                     ) -> dict[int, str]:
  """The members, but `skip`, with a non-finite metric in `fetched` (leaves `[K]`).

  Returns:
    `{k: "member k (seed s): training diverged: ..."}` (`divergence.check_metrics`'
    message of member k's metrics), empty when every member's are finite.
  """
  live = [k for k in range(len(seeds)) if k not in skip]
  # A sum over members is finite only when every member's metric is.
  if all(np.isfinite(np.sum(np.asarray(v)[live])) for m in fetched for v in m.values()):
    return {}
  found = {}
  for k in live:
    try:
      divergence.check_metrics([{n: np.asarray(v)[k] for n, v in m.items()}
                                for m in fetched], step, last_checkpoint)
    except divergence.Diverged as e:
      found[k] = f"member {k} (seed {seeds[k]}): {e}"
  return found


def unfinite_members(states: PyTree, seeds: Sequence[int], step: int,
                     last_checkpoint: str | None, skip: Collection[int] = ()
                     ) -> dict[int, str]:
  """The members, but `skip`, whose stacked state holds a NaN or an infinity.

  Returns:
    `{k: "member k (seed s): training diverged: the state is not finite ..."}`
    (`divergence.check_state_finite`'s message of member k's state).
  """
  finite = np.asarray(jax.device_get(jax.vmap(divergence.all_finite)(states)))
  found = {}
  for k in np.flatnonzero(~finite):
    if int(k) in skip:
      continue
    try:
      divergence.check_state_finite(unstack(states, int(k)), step, last_checkpoint)
    except divergence.Diverged as e:
      found[int(k)] = f"member {k} (seed {seeds[k]}): {e}"
  return found


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
  """`mean` and `std` (sample, ddof=1) of the K figures that are not None
  (a diverged member's, or a split that is not there), and `members`, all K.

  `mean` is None when no figure is there, `std` when fewer than two are.
  """
  values = [None if v is None else float(v) for v in values]
  there = [v for v in values if v is not None]
  return {"mean": float(np.mean(there)) if there else None,
          "std": float(np.std(there, ddof=1)) if len(there) > 1 else None,
          "members": values}
