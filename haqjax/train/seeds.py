"""`train_and_evaluate_seeds(config, workdir, seeds)`: one QAT recipe over K seeds.

The K fine-tunes run as one vmapped job (`haqjax.train.members`); member k
is the standalone run with `seed = seeds[k]` to float tolerance. The
workdir holds:

  config.json        the recipe (its seed is the first member's)
  layers.json, policy.json
  members_S0_S1_.../ the vmapped job of the members not yet finished:
                     stacked checkpoints (a rerun resumes) and metrics.jsonl
  seed_S/            member S as a standalone run leaves its workdir:
                     config.json (seed S), policy.json, checkpoints/ (its
                     final state) and results.json, written last
  results.json       mean, sample standard deviation and members of the test
                     and validation top-1, written once every member is

A member whose `seed_S/results.json` exists is finished and never trained
again, so a rerun after a kill keeps every finished member (and a rerun with
more seeds trains only the new ones). Every results file is written to a
temporary file, then renamed.

A member that diverges (`haqjax.train.divergence`) is dropped from the job
while the others train on: its `seed_S/results.json` holds `diverged` (the
message naming step and metric) and no figures or checkpoint, and the
summary is over the other members, with `diverged` listing the dropped
ones. Only when every member diverges does the job stop (`Diverged`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from haqjax import data as haq_data
from haqjax import io as haq_io
from haqjax.nn import layer_table
from haqjax.policy import save_policy
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import divergence
from haqjax.train import members
from haqjax.train import trainer
from haqjax.train.config import Config

# Figures summarised over members (mean, std, members), and the rest averaged.
SUMMARISED = ("test_top1", "val_top1")
AVERAGED = ("test_top5", "test_loss", "val_loss")


def check_seeds(seeds: int) -> int:
  """`seeds` (K) when it is a positive integer; else a one-line `ValueError`."""
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"--seeds is {seeds}; allowed: a positive integer")
  return seeds


def seed_list(first: int, count: int) -> tuple[int, ...]:
  """The members' seeds: `first, first + 1, ..., first + count - 1`."""
  return tuple(range(first, first + check_seeds(count)))


def member_dir(workdir: str, seed: int) -> str:
  """The folder of the member with `seed`."""
  return os.path.join(workdir, f"seed_{seed}")


def _read(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def summary_keys(results: dict[str, Any]) -> dict[str, Any]:
  """The `<figure>_mean/_std/_members` keys and `seeds` of K-seed results ({} for one run)."""
  if "seeds" not in results:
    return {}
  keys = {"seeds": results["seeds"]}
  for name in SUMMARISED:
    for part in ("mean", "std", "members"):
      keys[f"{name}_{part}"] = results.get(f"{name}_{part}")
  return keys


def aggregate(config: Config, workdir: str, seeds: Sequence[int],
              done: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The K-seed results of finished members `done` (in `seeds`' order).

  `test_top1` and `val_top1` are the means of the members that did not
  diverge (readers of one run's results keep working); beside them
  `<name>_mean`, `<name>_std` (sample, ddof=1) and `<name>_members` (None for
  a diverged member), `members` (seed, folder, figures, `diverged`) and
  `diverged` (`{"seed", "message"}` of each dropped member).
  """
  finished = [r for r in done if not r.get("diverged")]
  first = finished[0]
  results = {k: first.get(k) for k in ("mode", "model", "dataset", "policy",
                                       "weight_quantizer", "act_quantizer", "steps",
                                       "epochs", "devices")}
  results["seeds"] = list(seeds)
  for name in SUMMARISED:
    stats = members.summarize([r.get(name) for r in done])
    results[name] = stats["mean"]
    results.update({f"{name}_{part}": value for part, value in stats.items()})
  for name in AVERAGED:
    values = [r.get(name) for r in finished]
    results[name] = None if None in values else float(np.mean(values))
  results["members"] = [
      {"seed": s, "directory": os.path.relpath(member_dir(workdir, s), workdir),
       **{name: r.get(name) for name in (*SUMMARISED, "test_top5", "diverged")}}
      for s, r in zip(seeds, done)]
  results["diverged"] = [{"seed": s, "message": r["diverged"]}
                         for s, r in zip(seeds, done) if r.get("diverged")]
  results["first_step_seconds"] = first.get("first_step_seconds")
  results["train_seconds"] = first.get("train_seconds")
  return results


def train_and_evaluate_seeds(config: Config, workdir: str, seeds: Sequence[int]
                             ) -> dict[str, Any]:
  """Fine-tunes `config` (mode 'qat') once per seed, as one vmapped job.

  Args:
    config: the recipe; `config.seed` must be `seeds[0]`.
    workdir: where everything is written (see the module docstring); a
      rerun resumes and never retrains a finished member.
    seeds: the members' seeds, at least two.

  Returns:
    The K-seed results, as written to `results.json` (see `aggregate`).

  Raises:
    ValueError: as `trainer.train_and_evaluate` does, and for a config whose
      seed is not the first member's.
    divergence.Diverged: when every member diverged.
  """
  seeds = tuple(int(s) for s in seeds)
  if config.seed != seeds[0]:
    raise ValueError(f"seed={config.seed} is not the first member's ({seeds[0]})")
  workdir = os.path.abspath(workdir)
  trainer.check_workdir(config, workdir)
  pending = [s for s in seeds if _read(os.path.join(member_dir(workdir, s),
                                                    "results.json")) is None]
  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         manual_dir=config.manual_dir, val_size=config.val_size,
                         split_seed=config.split_seed)
  model = trainer.build_model(config, splits.spec.num_classes)
  table = layer_table(model, (1, *splits.spec.image_shape))
  policy = trainer.resolve_policy(config, table)
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(workdir, exist_ok=True)
    config.save(os.path.join(workdir, "config.json"))
    haq_io.write_json(os.path.join(workdir, "layers.json"), table.rows())
    if policy is not None:
      save_policy(os.path.join(workdir, "policy.json"), policy, model=config.model)
  if pending:
    _train_pending(config, workdir, model, splits, table, policy, pending, primary)
  done = [_read(os.path.join(member_dir(workdir, s), "results.json")) for s in seeds]
  if all(r.get("diverged") for r in done):
    raise divergence.Diverged(f"every member diverged; the first: {done[0]['diverged']}")
  results = aggregate(config, workdir, seeds, done)
  if primary:
    haq_io.write_json(os.path.join(workdir, "results.json"), results)
  return results


def _train_pending(config: Config, workdir: str, model, splits, table, policy,
                   pending: Sequence[int], primary: bool) -> None:
  """Trains the unfinished members as one vmapped job and writes each one's folder."""
  steps_per_epoch = haq_data.num_batches(splits.train, config.batch_size,
                                         drop_remainder=True)
  _, _, tx = members.schedule_and_optimizer(config, max(steps_per_epoch, 1))
  variables = ckpt_lib.restore_variables(config.init_from) if config.init_from else None
  states = members.init_members(config, model, tx, splits, [policy] * len(pending),
                                pending, variables)
  policies = members.stack([policy] * len(pending))
  job_dir = os.path.join(workdir, "members_" + "_".join(str(s) for s in pending))
  fitted = members.fit_members(config, model, splits, states, policies, pending, job_dir,
                               keep_going=True)
  if not primary:
    return
  for k, seed in enumerate(pending):
    directory = member_dir(workdir, seed)
    member_config = config.replace(seed=seed)
    os.makedirs(directory, exist_ok=True)
    member_config.save(os.path.join(directory, "config.json"))
    haq_io.write_json(os.path.join(directory, "layers.json"), table.rows())
    if policy is not None:
      save_policy(os.path.join(directory, "policy.json"), policy, model=config.model)
    if k in fitted["diverged"]:
      logging.warning("%s; dropped, the other members train on", fitted["diverged"][k])
      haq_io.write_json(os.path.join(directory, "results.json"), {
          "mode": config.mode, "model": config.model, "dataset": config.dataset,
          "seed": seed, "diverged": fitted["diverged"][k], "test_top1": None,
          "val_top1": None, "steps": fitted["steps"]})
      continue
    checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=config.keep_checkpoints)
    checkpointer.save(fitted["steps"], members.unstack(fitted["state"], k),
                      {"epoch": int(fitted["epochs"]) - 1})
    checkpointer.wait()
    checkpointer.close()
    test, val = fitted["test"][k], (fitted["val"][k] if fitted["val"] else {})
    haq_io.write_json(os.path.join(directory, "results.json"), {
        "mode": config.mode, "model": config.model, "dataset": config.dataset,
        "policy": None if policy is None else policy.to_dict()["layers"],
        "weight_quantizer": config.weight_quantizer if policy is not None else None,
        "act_quantizer": config.act_quantizer if policy is not None else None,
        "steps": fitted["steps"], "epochs": fitted["epochs"], "seed": seed,
        "test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
        "val_top1": val.get("top1"), "val_loss": val.get("loss"),
        # The vmapped job's, shared by its members.
        "first_step_seconds": fitted["first_step_seconds"],
        "train_seconds": fitted["train_seconds"], "vmapped_members": len(pending),
        "devices": jax.device_count(),
    })


def exported_member(results: dict[str, Any]) -> int:
  """The member a K-seed run exports: the first that did not diverge (the
  first with a test top-1 in `test_top1_members`, `results` or its
  `summary_keys`)."""
  tops = results.get("test_top1_members") or []
  return next((k for k, v in enumerate(tops) if v is not None), 0)
