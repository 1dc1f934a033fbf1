"""The search families as runners of one budget: uniform, RL, Gumbel, HAWQ, greedy.

What `python -m experiments.bench searches` and `python -m experiments.compare`
share: the configs of a budget's searches (a training recipe with the
quickstart's search recipes, `quickstart_rl` and `quickstart_sweep`, on
top), their sizes (`FULL`, the recipes', or `QUICK`, toy ones) and one
function per family from the FP32 weights to a policy:

  uniform  the budget's uniform policy itself;
  uniform_max  the uniform policy with the most bits within the budget,
           at least the budget's own in both roles (a baseline: the
           budget's own, unless a wider one costs no more);
  rl       HAQ's DDPG search (scorer built, then the episodes);
  rl_executed  the same with `quickstart_rl_executed.flags`' agent: the
           replay stores the walled bits, the noise decays by 0.96;
  rl_saving  `rl_executed` with `quickstart_rl_saving.flags`' budget wall,
           which lowers the bits that save the most cost per bit first;
  gumbel   the differentiable search (calibration, then the steps), a
           quantizer per candidate bit-width;
  gumbel_absolute  the same with `quickstart_sweep_absolute.flags`' penalty,
           TuNAS's absolute value;
  gumbel_shared  the same with one quantizer per layer shared by every
           candidate, calibrated at the top one (`quickstart_sweep_shared.flags`);
  gumbel_undominated  the same with the candidates a wider one matches at no
           more cost widened (`quickstart_sweep_undominated.flags`);
  hawq     one sensitivity pass (Gauss-Newton traces and errors per
           channel) and HAWQ-V3's ILP;
  greedy   the same pass and the greedy allocation;
  hawq_tensor, greedy_tensor  the same with HAWQ's pass per tensor
           (`--hawq_granularity=tensor`).

Every family reads its seed from `config.seed` (RL: the agent, the scorer's
fine-tunes; Gumbel: the start and the sampling; HAWQ and greedy: the
pass's batches and probes), so a search repeated over seeds is the same
call with `config.replace(seed=s)`. `find` returns a JSON-able record of
the policy and the search's wall time; `cached` keeps it on disk, so a
rerun reads it back.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

QUANTIZERS = {"minmax": ("minmax", "static"), "lsq": ("lsq", "lsq"),
              "lsq_mse": ("lsq_mse", "lsq_mse")}
FAMILIES = ("uniform", "rl", "gumbel", "hawq", "greedy")
# Variants of a family: (family, recipe whose agent or Gumbel settings replace
# its own).
VARIANTS = {"rl_executed": ("rl", "quickstart_rl_executed"),
            "rl_saving": ("rl", "quickstart_rl_saving"),
            "gumbel_absolute": ("gumbel", "quickstart_sweep_absolute"),
            "gumbel_shared": ("gumbel", "quickstart_sweep_shared"),
            "gumbel_undominated": ("gumbel", "quickstart_sweep_undominated")}
# Variants of HAWQ and greedy: (family, the `HawqConfig` fields they change).
HAWQ_VARIANTS = {"hawq_tensor": ("hawq", {"hawq_granularity": "tensor"}),
                 "greedy_tensor": ("greedy", {"hawq_granularity": "tensor"})}
HAWQ_FAMILIES = ("hawq", "greedy", *HAWQ_VARIANTS)
# Uniform baselines beside the budget's own uniform policy; they search nothing.
BASELINES = ("uniform_max",)
# Budgets of the searches bench's Pareto fronts, ratios of uniform W4A4's
# latency (W3A3's is 0.83, W5A5's 1.233, W6A6's 1.523).
FRONT_BUDGETS = (0.7, 0.83, 0.92, 1.0, 1.12, 1.233, 1.38, 1.523)
# The persistent compilation cache of `--quick` when --compilation_cache is unset.
QUICK_CACHE = "~/.cache/haqjax/jit"


@dataclasses.dataclass(frozen=True)
class Plan:
  """The sizes of a run (the recipes', or `QUICK`'s)."""
  fp32_epochs: float = 10.0
  rl_episodes: int | None = None
  rl_warmup: int | None = None
  rl_finetune_steps: int | None = None
  search_val_size: int | None = None
  gumbel_epochs: float | None = None
  gumbel_warmup_epochs: float | None = None
  hawq: tuple[tuple[str, Any], ...] = ()
  finetune_epochs: float | None = None
  front_budgets: tuple[float, ...] = FRONT_BUDGETS


FULL = Plan()
QUICK = Plan(fp32_epochs=1.0, rl_episodes=6, rl_warmup=3, rl_finetune_steps=4,
             search_val_size=1000, gumbel_epochs=0.05, gumbel_warmup_epochs=0.01,
             hawq=(("hawq_probes", 2), ("hawq_max_iterations", 2),
                   ("hawq_tolerance", 0.0), ("hawq_batches", 1)),
             finetune_epochs=0.05, front_budgets=(0.83, 1.0, 1.233))


def configs(quantizer: str, budget: str, plan: Plan, fp32_dir: str | None,
            data_dir: str | None, *, recipe: str = "quickstart",
            target: str = "bismo-edge", metric: str = "latency"):
  """`(Config, SearchConfig, GumbelConfig, HawqConfig)` of one budget's searches.

  Args:
    quantizer: a key of `QUANTIZERS`.
    budget: the uniform policy whose cost is the budget, e.g. 'w4a4'.
    plan: the sizes.
    fp32_dir: the FP32 run every search starts from (`init_from`).
    data_dir: the prepared datasets folder.
    recipe: the training recipe (model, dataset, batch sizes: its flags
      other than --mode replace the quickstart's); the searches' and the
      fine-tune's settings are the quickstart search recipes'.
    target: the hardware target of the budget.
    metric: the budget's metric.
  """
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel.config import GumbelConfig  # pylint: disable=g-import-not-at-top
  from haqjax.search.hawq.config import HawqConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  weight, act = QUANTIZERS[quantizer]
  (trained,) = recipes.read_configs(recipe, (Config,))
  named = (k[2:] if v is None and k.startswith("no") and not hasattr(trained, k) else k
           for k, v in recipes.read_flags(recipes.recipe_path(recipe)).items())
  training = {k: getattr(trained, k) for k in named if k != "mode"}
  common = dict(training, data_dir=data_dir, progress=False, tensorboard=False,
                init_from=fp32_dir, weight_quantizer=weight, act_quantizer=act)
  config, search = recipes.read_configs("quickstart_rl", (Config, SearchConfig), **common)
  _, _, gumbel = recipes.read_configs("quickstart_sweep", (Config, SearchConfig,
                                                           GumbelConfig), **common)
  ddpg = search.ddpg.replace(**{k: v for k, v in (("warmup_episodes", plan.rl_warmup),)
                                if v is not None})
  changes = {"search_episodes": plan.rl_episodes, "search_val_size": plan.search_val_size,
             "search_finetune_steps": plan.rl_finetune_steps,
             "finetune_epochs": plan.finetune_epochs}
  search = search.replace(budget=1.0, budget_reference=budget, ddpg=ddpg,
                          finetune_uniform_reference=False, target=target,
                          budget_metric=metric,
                          **{k: v for k, v in changes.items() if v is not None})
  gumbel = gumbel.replace(**{k: v for k, v in (
      ("gumbel_epochs", plan.gumbel_epochs),
      ("gumbel_warmup_epochs", plan.gumbel_warmup_epochs)) if v is not None})
  return config, search, gumbel, HawqConfig(**dict(plan.hawq))


def variant_search(search, recipe: str):
  """`search` with the agent settings (`variant_ddpg`) and the budget wall's
  order of search recipe `recipe`."""
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  variant = recipes.read_configs(recipe, (Config, SearchConfig))[1]
  return search.replace(ddpg=variant_ddpg(search.ddpg, recipe),
                        wall_order=variant.wall_order)


def variant_ddpg(ddpg, recipe: str):
  """`ddpg` with the agent settings in which search recipe `recipe` differs from
  `quickstart_rl` (so a plan's own changes, `QUICK`'s warm-up, stay)."""
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  base, variant = (recipes.read_configs(r, (Config, SearchConfig))[1].ddpg
                   for r in ("quickstart_rl", recipe))
  return ddpg.replace(**{f.name: getattr(variant, f.name)
                         for f in dataclasses.fields(variant)
                         if getattr(variant, f.name) != getattr(base, f.name)})


def variant_gumbel(gumbel, recipe: str):
  """`gumbel` with the settings in which search recipe `recipe` differs from
  `quickstart_sweep` (a plan's own search length stays)."""
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel.config import GumbelConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  base, variant = (recipes.read_configs(r, (Config, SearchConfig, GumbelConfig))[2]
                   for r in ("quickstart_sweep", recipe))
  return gumbel.replace(**{f.name: getattr(variant, f.name)
                           for f in dataclasses.fields(variant)
                           if getattr(variant, f.name) != getattr(base, f.name)})


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
  """`(fn(*args, **kwargs), its wall seconds)`."""
  t0 = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - t0


def cached(path: str, compute, stamp: dict[str, Any] | None = None) -> dict[str, Any]:
  """The JSON object at `path`, else `compute()` written there (atomically).

  With `stamp` (`stamp_of`), an object whose stamp differs is computed again:
  a Gumbel search finished with another derivation only derives its policy
  again from its checkpoint, without training, and keeps the first search's
  seconds; one with other quantizers searches anew, in its own folder
  (`search_folder`), and counts its own.
  """
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  done = stages.read_json(path)
  if done is None or not stamped(done, stamp):
    rederived = done is not None and stamped(
        done, {k: v for k, v in (stamp or {}).items() if k != "gumbel_derive"})
    seconds = done["seconds"] if rederived else None
    done = compute()
    if seconds is not None:
      done["seconds"] = seconds
    haq_io.write_json(path, done)
  return done


def stamp_of(family: str, gumbel, hawq=None) -> dict[str, Any]:
  """The settings that a family's cached searches and rows must match beyond
  their configs' identity: the Gumbel derivation, quantizer sharing and
  candidates (a variant's; candidates only when not all, as before the field
  existed), the sensitivity pass's granularity."""
  if VARIANTS.get(family, (family,))[0] == "gumbel":
    if family in VARIANTS:
      gumbel = variant_gumbel(gumbel, VARIANTS[family][1])
    stamp = {"gumbel_derive": gumbel.gumbel_derive,
             "gumbel_quantizers": gumbel.gumbel_quantizers}
    if gumbel.gumbel_candidates != "all":
      stamp["gumbel_candidates"] = gumbel.gumbel_candidates
    return stamp
  if family in HAWQ_FAMILIES and hawq is not None:
    return {"hawq_granularity": hawq_of(family, hawq).hawq_granularity}
  return {}


# What records written before a stamp's field existed hold.
_LEGACY = {"gumbel_derive": "wall", "gumbel_quantizers": "shared",
           "gumbel_candidates": "all", "hawq_granularity": "tensor"}


def stamped(done: dict[str, Any], stamp: dict[str, Any] | None) -> bool:
  """Whether a cached record matches `stamp`."""
  return all(done.get(k, _LEGACY.get(k)) == v for k, v in (stamp or {}).items())


def search_rl(config, search, setup) -> Any:
  """HAQ's DDPG search (scorer built, then the episodes)."""
  from haqjax.jobs import rl as rl_job  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.search.rl import search as rl_search  # pylint: disable=g-import-not-at-top
  scorer = rl_job.make_scorer(config, search, setup.splits, setup.fp32_dir)
  problem = rl_job.build_problem(config, search, setup.table,
                                 stages.fp32_val_top1(config, search, setup))
  return rl_search.run(problem, scorer, os.path.join(setup.workdir, "rl_search"),
                       tensorboard=False).policy


def gumbel_start(config, search, gumbel, setup):
  """`(model, search, variables)`: the Gumbel search's start from the FP32 weights."""
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  model = trainer.build_model(stages.qat_config(config, search, policy="w8a8"),
                              setup.splits.spec.num_classes)
  gsearch = gumbel_job.build_search(config, gumbel, model, setup.table.names, setup.wall)
  return gsearch, stages.start_variables(config, model, setup.splits, setup.fp32_dir,
                                         gsearch.calibration_policies())


def gumbel_plan(config, gumbel, setup) -> tuple[int, int]:
  """`(steps per epoch, total steps)` of the Gumbel search."""
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  per_epoch = haq_data.num_batches(setup.splits.train, config.batch_size, drop_remainder=True)
  return per_epoch, gumbel_job.schedule(gumbel, per_epoch)["total"]


def search_folder(name: str, gumbel) -> str:
  """The folder of a Gumbel search's state: `name`, suffixed for per-candidate
  quantizers (a search with shared ones, written before they existed, is not
  resumed as one with its own) and for candidates other than all."""
  if gumbel.gumbel_quantizers != "shared":
    name = f"{name}_per_candidate"
  return name if gumbel.gumbel_candidates == "all" else f"{name}_{gumbel.gumbel_candidates}"


def search_gumbel(config, search, gumbel, setup) -> Any:
  """One differentiable search under the setup's budget."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  from haqjax.search import scoring  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import single  # pylint: disable=g-import-not-at-top
  gsearch, variables = gumbel_start(config, search, gumbel, setup)
  per_epoch, total = gumbel_plan(config, gumbel, setup)
  hparams = gumbel_job.make_hparams(gumbel, setup.wall.limit, per_epoch)
  return single.run(
      gsearch, hparams, gsearch.init(jax.random.PRNGKey(config.seed), hparams, variables),
      train=setup.splits.train, val=scoring.subset(setup.splits.val, search.search_val_size),
      wall=setup.wall, directory=os.path.join(setup.workdir, search_folder("gumbel_search",
                                                                          gumbel)),
      batch_size=config.batch_size, total_steps=total, seed=config.seed,
      eval_batch_size=config.eval_batch_size, tensorboard=False).policy


def sweep_gumbel(config, search, gumbel, setup, walls) -> list[Any]:
  """The Gumbel searches at every wall's budget as one vmapped sweep."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
  from haqjax.search import scoring  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  gsearch, variables = gumbel_start(config, search, gumbel, setup)
  per_epoch, total = gumbel_plan(config, gumbel, setup)
  hps = sweep_lib.stack([gumbel_job.make_hparams(gumbel, w.limit, per_epoch) for w in walls])
  keys = jax.numpy.stack([jax.random.PRNGKey(config.seed)] * len(walls))
  return sweep_lib.run(
      gsearch, hps, sweep_lib.init(gsearch, keys, hps, variables), train=setup.splits.train,
      val=scoring.subset(setup.splits.val, search.search_val_size), walls=walls,
      directory=os.path.join(setup.workdir, search_folder("gumbel_sweep", gumbel)),
      batch_size=config.batch_size,
      total_steps=total, seed=config.seed, eval_batch_size=config.eval_batch_size,
      tensorboard=False).policies


def hawq_of(family: str, hawq):
  """The `HawqConfig` of `family`: `hawq`, with a variant's changes."""
  return hawq.replace(**HAWQ_VARIANTS[family][1]) if family in HAWQ_VARIANTS else hawq


def sensitivity_folder(hawq) -> str:
  """The folder name of the sensitivity passes of `hawq`'s granularity: the
  families that share it share the passes ("sensitivity" per tensor,
  "sensitivity_channel" per channel)."""
  g = hawq.hawq_granularity
  return "sensitivity" if g == "tensor" else f"sensitivity_{g}"


def sensitivity_pass(config, search, hawq, setup, directory: str) -> tuple[Any, float]:
  """The one sensitivity pass of `config.seed` (`directory/sensitivity.json`), and its seconds.

  It does not depend on the budget: measured once for every budget (and
  target) that shares `directory`, and read back afterwards with the
  seconds it took.
  """
  from haqjax.jobs import hawq as hawq_job  # pylint: disable=g-import-not-at-top
  shared = dataclasses.replace(setup, workdir=directory)
  timing = cached(os.path.join(directory, "sensitivity_seconds.json"), lambda: {
      "seconds": timed(hawq_job.sensitivity_stage, config, search, hawq, shared)[1]})
  return hawq_job.sensitivity_stage(config, search, hawq, shared), timing["seconds"]


def policy_of(record: dict[str, Any]):
  """The `Policy` of a record (`record`'s output)."""
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  return Policy.create(record["names"], record["w_bits"], record["a_bits"])


def policy_key(policy) -> str:
  """A policy's folder name: "w8-4-4_a8-4-4" (weight, then activation bits per layer)."""
  return "_".join(f"{role}{'-'.join(str(int(b)) for b in bits)}"
                  for role, bits in (("w", policy.w_bits), ("a", policy.a_bits)))


def record(policy, seconds: float, **extra: Any) -> dict[str, Any]:
  """A policy's names and bits and its search's seconds, JSON-able."""
  return {"names": list(policy.names), "w_bits": [int(b) for b in policy.w_bits],
          "a_bits": [int(b) for b in policy.a_bits], "seconds": seconds, **extra}


def find(family: str, config, search, gumbel, hawq, setup,
         sensitivity_dir: str) -> dict[str, Any]:
  """`family`'s policy under the setup's budget, as a `record` with its seconds.

  Args:
    family: one of `FAMILIES`.
    config, search, gumbel, hawq: the budget's configs (`configs`); the
      search's seed is `config.seed`.
    setup: the budget's `stages.Setup`; RL and Gumbel write their search
      state under `setup.workdir`.
    sensitivity_dir: where HAWQ and greedy keep the sensitivity pass of
      `config.seed` (shared by every budget).
  """
  from haqjax.jobs import hawq as hawq_job  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import uniform  # pylint: disable=g-import-not-at-top
  from haqjax.search.hawq import greedy  # pylint: disable=g-import-not-at-top
  from haqjax.search.hawq import ilp  # pylint: disable=g-import-not-at-top
  allowed = FAMILIES + BASELINES + tuple(VARIANTS) + tuple(HAWQ_VARIANTS)
  if family not in allowed:
    raise ValueError(f"family is {family!r}; allowed: {', '.join(allowed)}")
  hawq = hawq_of(family, hawq)
  family = HAWQ_VARIANTS.get(family, (family,))[0]
  if family in VARIANTS:
    family, recipe = VARIANTS[family]
    if family == "rl":
      search = variant_search(search, recipe)
    else:
      gumbel = variant_gumbel(gumbel, recipe)
  if family == "uniform":
    return record(uniform.policy_of(setup.wall, setup.table.names,
                                    search.budget_reference), 0.0)
  if family == "uniform_max":
    return record(uniform.widest_fitting(setup.wall, setup.table.names,
                                         uniform.bits_of(search.budget_reference)), 0.0)
  if family == "rl":
    return record(*timed(search_rl, config, search, setup))
  if family == "gumbel":
    return record(*timed(search_gumbel, config, search, gumbel, setup),
                  **stamp_of("gumbel", gumbel))
  sensitivity, pass_s = sensitivity_pass(config, search, hawq, setup, sensitivity_dir)
  problem = hawq_job.build_problem(search, hawq, setup, sensitivity)
  policy, seconds = timed(ilp.solve if family == "hawq" else greedy.solve, problem)
  return record(policy, pass_s + seconds, sensitivity_seconds=pass_s,
                allocation_seconds=seconds)
