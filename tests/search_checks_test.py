"""Searches that search: each family beats random policies of its cost, and not without its signal.

On digits (digits_cnn, 8 FP32 epochs) under a tight budget, `bismo-edge`
latency no more than uniform W3A3's, each family (RL, Gumbel, HAWQ's ILP,
greedy) must end with a policy within the budget whose held-out top-1 beats
the median of `RANDOM_POLICIES` random policies of the same cost. Held-out
top-1 is the same measurement for every policy: the FP32 weights, static
activation ranges calibrated under the policy on 4 training batches, no
fine-tune, top-1 on the test split (the searches score on the validation
split, or train on the training split).

Random policies of the same cost are drawn uniformly among those whose cost
lies in `[BAND, 1]` times the budget (rejection sampling). The budget wall's
repair of a random draw (`BudgetWall.enforce`, last layers lowered first)
would give lopsided policies, a lower median (49.7 against 59.2 over 100 of
each when this was written), so the band is the harder baseline.

Each family also runs `NOISE_SEEDS` times with its signal replaced by noise:
RL with a random reward, Gumbel with its task loss on random labels (so its
gradient says nothing about the task; the cost penalty is left as it is),
HAWQ and greedy with the sensitivity table `Omega[l, w, a]` replaced by
uniform noise. A signal-free search that beats the median only by chance
does so with probability 1/2 per seed; the check fails when every seed beats
it (probability 1/32 under chance), which would mean that the search's
structure alone passes the first check, and when the searched policy does
not beat the median of its signal-free runs.

Greedy fails that check here: its allocation is set by the cost table, not
by the sensitivities. It takes the move of least sensitivity increase per
latency saved, so moves that save much latency (the stem's input bits) go
first whatever the sensitivities are, and every noise seed ends at the same
policy, above the median (see `GREEDY_UNDISCRIMINATED`).

The checkpoints of the searches are an in-memory stand-in here (their
resumption is tested in `search_resume_test.py` and
`search_gumbel_resume_test.py`), so each search costs its own work. Seeds are
fixed, so the module is deterministic on CPU.
"""

import dataclasses
import itertools
from typing import NamedTuple
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import recipes
from haqjax import data as haq_data
from haqjax.jobs import gumbel as gumbel_job
from haqjax.jobs import rl as rl_job
from haqjax.jobs import stages
from haqjax.nn import LayerTable
from haqjax.nn import layer_table
from haqjax.policy import Policy
from haqjax.search import scoring
from haqjax.search.config import SearchConfig
from haqjax.search.env import BudgetWall
from haqjax.search.gumbel import GumbelConfig
from haqjax.search.gumbel import single
from haqjax.search.hawq import greedy
from haqjax.search.hawq import ilp
from haqjax.search.hawq import measure
from haqjax.search.hawq.problem import Problem
from haqjax.search.rl import search as rl_search
from haqjax.search.rl.config import DDPGConfig
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import trainer
from haqjax.train.config import Config

FP32_EPOCHS = 8
RANDOM_POLICIES = 16
# Random policies cost between BAND and 1 times the budget.
BAND = 0.9
NOISE_SEEDS = 5
RL_EPISODES = 24
GUMBEL_EPOCHS = 2.0
# The recipes' candidates less 5 bits: each of the six Gumbel runs traces its
# mixed step again, and one candidate fewer cut that from 3.6 to 2.0 CPU-s.
GUMBEL_BITS = "2,3,4,6,8"
BITS = tuple(range(2, 9))
FAMILIES = ("rl", "gumbel", "hawq", "greedy")


class _MemoryCheckpointer:
  """`haqjax.train.checkpoint.Checkpointer`'s interface, keeping nothing."""

  def __init__(self, workdir, *, max_to_keep=2, create=True):
    del workdir, max_to_keep, create

  def latest_step(self):
    return None

  def path(self, step):
    return f"memory/{step}"

  def save(self, step, state, metadata):
    del step, state, metadata

  def wait(self):
    pass

  def close(self):
    pass


def in_memory_checkpoints():
  """Patches the searches' checkpointer with `_MemoryCheckpointer` (a context)."""
  return mock.patch.object(ckpt_lib, "Checkpointer", _MemoryCheckpointer)


class World(NamedTuple):
  """The FP32 model, the budget and the held-out measurement every check shares."""
  config: Config
  search: SearchConfig
  splits: haq_data.Splits
  table: LayerTable
  wall: BudgetWall
  model: nn.Module
  fp32_dir: str
  fp32_val: float
  # The FP32 weights with the quantizers calibrated at the top bits (the
  # start of the Gumbel search and the point of the sensitivity pass).
  start: dict
  judge: scoring.QATScorer
  val_scorer: scoring.QATScorer

  @property
  def names(self) -> tuple[str, ...]:
    return self.table.names

  def held_out_top1(self, policy: Policy) -> float:
    return float(self.judge(policy)["top1"])


class Outcome(NamedTuple):
  """A family's searched policy and top-1, and its signal-free runs' top-1s."""
  policy: Policy
  top1: float
  noise: tuple[float, ...]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("search_checks")
  overrides = {"data_dir": str(tmp / "data"), "progress": False, "tensorboard": False}
  fp32_dir = str(tmp / "fp32")
  trainer.train_and_evaluate(recipes.load_recipe("digits", epochs=FP32_EPOCHS,
                                                 **overrides), fp32_dir)
  config = recipes.load_recipe("digits", mode="rl", **overrides)
  search = SearchConfig(target="bismo-edge", budget_metric="latency", budget=1.0,
                        budget_reference="w3a3", search_finetune_steps=0)
  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         val_size=config.val_size, split_seed=config.split_seed)
  table = layer_table(trainer.build_model(config.replace(mode="train"),
                                          splits.spec.num_classes),
                      (1, *splits.spec.image_shape))
  model = trainer.build_model(stages.qat_config(config, search, policy="w8a8"),
                              splits.spec.num_classes)
  variables = ckpt_lib.restore_variables(fp32_dir)

  def scorer(split):
    return scoring.QATScorer(model, variables, splits.train, split, num_steps=0,
                             batch_size=config.batch_size, learning_rate=0.01,
                             eval_batch_size=config.eval_batch_size, seed=config.seed)

  wall = stages.build_wall(config, search, table)
  n = len(table)
  top = Policy.create(table.names, *wall.fixed.apply(np.full(n, max(BITS)),
                                                     np.full(n, max(BITS))))
  return World(config=config, search=search, splits=splits, table=table, wall=wall,
               model=model, fp32_dir=fp32_dir,
               fp32_val=stages.fp32_top1(config, splits, search, fp32_dir),
               start=stages.start_variables(config, model, splits, fp32_dir, top),
               judge=scorer(splits.test), val_scorer=scorer(splits.val))


def random_policies(wall, names, count: int, seed: int) -> list[Policy]:
  """`count` policies uniform over those costing `[BAND, 1]` x the budget."""
  rng = np.random.default_rng(seed)
  n, out = len(names), []
  while len(out) < count:
    w, a = wall.fixed.apply(*rng.integers(BITS[0], BITS[-1] + 1, (2, n)))
    if BAND * wall.limit <= wall.cost(w, a) and wall.fits(w, a):
      out.append(Policy.create(names, w, a))
  return out


@pytest.fixture(scope="module")
def random_median(world):
  return float(np.median([world.held_out_top1(p) for p in
                          random_policies(world.wall, world.names, RANDOM_POLICIES, 0)]))


# ------------------------------------------------------------------------- RL


class RandomReward:
  """An episode scorer whose top-1 is uniform noise in [0, 100]."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)

  def __call__(self, policy: Policy) -> dict[str, float]:
    del policy
    return {"top1": float(self.rng.uniform(0.0, 100.0))}


def run_rl(w: World, scorer, seed: int, directory: str) -> Policy:
  search = w.search.replace(search_episodes=RL_EPISODES, ddpg=DDPGConfig(
      hidden=(32, 32), batch_size=16, warmup_episodes=RL_EPISODES // 2))
  problem = rl_job.build_problem(w.config.replace(seed=seed), search, w.table, w.fp32_val)
  with in_memory_checkpoints():
    return rl_search.run(problem, scorer, directory, tensorboard=False).policy


@pytest.fixture(scope="module")
def rl(world, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("rl")
  policy = run_rl(world, world.val_scorer, 0, str(tmp / "search"))
  noise = tuple(world.held_out_top1(run_rl(world, RandomReward(s), s, str(tmp / f"noise{s}")))
                for s in range(NOISE_SEEDS))
  return Outcome(policy, world.held_out_top1(policy), noise)


# --------------------------------------------------------------------- Gumbel


class RandomLabels:
  """A split source whose labels are drawn at random, once per example."""

  def __init__(self, source, num_classes: int, seed: int):
    self.source = source
    self.in_memory = source.in_memory
    self.labels = np.random.default_rng(seed).integers(
        0, num_classes, len(source)).astype(np.int32)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, rows, **kwargs):
    images, _ = self.source.read(rows, **kwargs)
    return images, self.labels[rows]


def run_gumbel(w: World, train, seed: int, directory: str) -> Policy:
  gumbel = GumbelConfig(gumbel_bits=GUMBEL_BITS, gumbel_epochs=GUMBEL_EPOCHS,
                        gumbel_warmup_epochs=0.25)
  gsearch = gumbel_job.build_search(w.config, gumbel, w.model, w.names, w.wall)
  steps_per_epoch = haq_data.num_batches(train, w.config.batch_size, drop_remainder=True)
  hparams = gumbel_job.make_hparams(gumbel, w.wall.limit, steps_per_epoch)
  # The search's step donates its state: a copy of the shared start.
  state = gsearch.init(jax.random.PRNGKey(seed), hparams, jax.tree.map(jnp.copy, w.start))
  with in_memory_checkpoints():
    return single.run(
        gsearch, hparams, state, train=train, val=w.splits.val, wall=w.wall,
        directory=directory, batch_size=w.config.batch_size,
        total_steps=gumbel_job.schedule(gumbel, steps_per_epoch)["total"], seed=seed,
        eval_batch_size=w.config.eval_batch_size, tensorboard=False).policy


@pytest.fixture(scope="module")
def gumbel(world, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("gumbel")
  train = world.splits.train
  policy = run_gumbel(world, train, 0, str(tmp / "search"))
  noise = []
  for s in range(NOISE_SEEDS):
    noisy = dataclasses.replace(train, source=RandomLabels(
        train.source, world.splits.spec.num_classes, s))
    noise.append(world.held_out_top1(run_gumbel(world, noisy, s, str(tmp / f"noise{s}"))))
  return Outcome(policy, world.held_out_top1(policy), tuple(noise))


# -------------------------------------------------------------- HAWQ, greedy


@pytest.fixture(scope="module")
def sensitivity(world):
  batches = list(itertools.islice(haq_data.batches(
      world.splits.train, batch_size=world.config.batch_size, seed=0, epoch=0,
      shuffle=True, drop_remainder=True), 2))
  return measure.sensitivity_pass(jax.random.key(0), world.model, world.start, batches,
                                  w_bits=BITS, a_bits=BITS, probes=4, tol=1e-2,
                                  max_iterations=6)


def random_omega(omega: np.ndarray, seed: int) -> np.ndarray:
  """A table like `omega` `[L, 9, 9]` of uniform noise in [0, 1] (inf where it is)."""
  noise = np.random.default_rng(seed).uniform(0.0, 1.0, omega.shape)
  return np.where(np.isfinite(omega), noise, np.inf)


def allocation(world, omega: np.ndarray, solve) -> Policy:
  wall = world.wall
  return solve(Problem.create(world.names, omega, wall.tensor, wall.limit, w_bits=BITS,
                              a_bits=BITS, fixed_w=wall.fixed.w, fixed_a=wall.fixed.a))


def _allocated(world, sensitivity, solve) -> Outcome:
  policy = allocation(world, sensitivity.omega, solve)
  noise = tuple(world.held_out_top1(allocation(world, random_omega(sensitivity.omega, s),
                                               solve))
                for s in range(NOISE_SEEDS))
  return Outcome(policy, world.held_out_top1(policy), noise)


@pytest.fixture(scope="module")
def hawq(world, sensitivity):
  return _allocated(world, sensitivity, ilp.solve)


@pytest.fixture(scope="module")
def greedy_baseline(world, sensitivity):
  return _allocated(world, sensitivity, greedy.solve)


def _outcome(request, family: str) -> Outcome:
  return request.getfixturevalue("greedy_baseline" if family == "greedy" else family)


@pytest.mark.parametrize("family", FAMILIES)
def test_search_beats_random_policies_of_its_cost(request, world, random_median, family):
  out = _outcome(request, family)
  w, a = np.asarray(out.policy.w_bits), np.asarray(out.policy.a_bits)
  assert world.wall.fits(w, a), world.wall.describe(w, a)
  assert out.top1 > random_median, (family, out.top1, random_median)


GREEDY_UNDISCRIMINATED = pytest.mark.xfail(strict=True, reason=(
    "greedy with uniform-noise sensitivities ends at W 8 4 6 / A 2 8 8 for every "
    "seed (72.22 held-out top-1), above the random median (56.67) and above the "
    "searched greedy policy, W 8 4 4 / A 2 8 8 (69.72): on digits_cnn the cost "
    "table, not the sensitivities, sets its moves"))


@pytest.mark.parametrize("family", [*FAMILIES[:-1], pytest.param(
    "greedy", marks=GREEDY_UNDISCRIMINATED)])
def test_search_without_its_signal_does_not(request, random_median, family):
  out = _outcome(request, family)
  print(f"{family}: searched {out.top1:.2f}, random median {random_median:.2f}, "
        f"signal-free {', '.join(f'{t:.2f}' for t in out.noise)}")
  assert not all(top1 > random_median for top1 in out.noise), (
      family, out.noise, random_median)
  # The signal is what lifts the search above its signal-free runs.
  assert out.top1 > np.median(out.noise), (family, out.top1, out.noise)
