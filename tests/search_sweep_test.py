"""Sweeps: member k is the standalone search; flag errors; the table and the plot."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import data as haq_data
from haqjax import hardware
from haqjax import models
from haqjax.nn import layer_table
from haqjax.search import env
from haqjax.search.gumbel import GumbelSearch
from haqjax.search.gumbel import HParams
from haqjax.search.gumbel import candidate_rows
from haqjax.search.gumbel import candidate_tensor
from haqjax.search.gumbel import single as search_lib
from haqjax.search.gumbel import sweep as sweep_lib
from haqjax.train import checkpoint as ckpt_lib
from launcher_testing import launch_many
from launcher_testing import shared_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BITS = (2, 3, 4, 6, 8)
STEPS = 6


def _hp(limit, **changes):
  values = dict(limit=limit, tau0=5.0, tau_min=0.5, anneal_steps=float(STEPS),
                dual_lr=0.1, arch_lr=0.05, weight_lr=0.01, warmup_steps=1.0,
                freeze_step=1e9)
  lam = changes.pop("lam", 1.0)  # The penalty's weight, whichever its form.
  values.update(changes, hinge_weight=lam, multiplier_init=lam)
  return HParams.create(**values)


def _restore(directory, template):
  leaves, treedef = jax.tree.flatten(template)
  checkpointer = ckpt_lib.Checkpointer(str(directory))
  restored, _ = checkpointer.restore({"leaves": leaves})
  checkpointer.close()
  return jax.tree.unflatten(treedef, list(restored["leaves"]))


def _sweep_problem(relaxation):
  """Digits, a search and three members with different budgets and settings."""
  splits = haq_data.load("digits", val_size=200)
  model = models.create("digits_cnn", num_classes=10)
  variables = model.init(jax.random.key(1), np.zeros((1, 8, 8, 1), np.float32))
  table = layer_table(model, (1, 8, 8, 1))
  target, layers = hardware.get_target("bismo-edge"), hardware.from_layer_table(table)
  fixed = env.Fixed.create(len(table), mode="linear")
  walls = [env.BudgetWall(target, layers, hardware.Budget(metric="latency", value=v),
                          min_bits=2, max_bits=8, fixed=fixed) for v in (0.35, 0.6, 0.9)]
  w_rows, a_rows = candidate_rows(BITS, fixed.w, fixed.a)
  search = GumbelSearch(model, table.names, w_rows, a_rows,
                        candidate_tensor(walls[0].layer_costs, w_rows, a_rows),
                        np.zeros(len(table), bool), relaxation=relaxation)
  hps = [_hp(walls[0].limit, lam=2.0), _hp(walls[1].limit, tau0=2.0, arch_lr=0.1),
         _hp(walls[2].limit, lam=0.1, weight_lr=0.02, dual_lr=0.5)]
  return splits, search, walls, hps, variables


@pytest.mark.parametrize("relaxation", ["gumbel", "softmax"])
def test_member_gradients_equal_standalone(relaxation):
  """One vmapped gradient is each member's own gradient, to float precision."""
  splits, search, _, hps, variables = _sweep_problem(relaxation)
  keys = jax.random.split(jax.random.PRNGKey(3), len(hps))
  stacked = sweep_lib.stack(hps)
  states = sweep_lib.init(search, keys, stacked, variables)
  batch = next(haq_data.batches(splits.train, batch_size=64, seed=0, epoch=0,
                                shuffle=True, drop_remainder=True))

  def grads(state, hp):
    trainable = {"model": state.params, "arch": state.logits}
    key = jax.random.fold_in(state.key, state.step)
    return jax.grad(lambda t: search.loss(t, state, batch, hp, key)[0])(trainable)

  swept = jax.jit(jax.vmap(grads))(states, stacked)
  for k in range(len(hps)):
    single = jax.jit(grads)(sweep_lib.member(states, k), hps[k])
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-8),
                 sweep_lib.member(swept, k), single)


@pytest.mark.parametrize("relaxation", ["gumbel", "softmax"])
def test_member_equals_standalone_search(tmp_path, relaxation):
  splits, search, walls, hps, variables = _sweep_problem(relaxation)
  keys = lambda: jax.random.split(jax.random.PRNGKey(3), len(hps))  # Fresh: donated.
  fresh = lambda: jax.tree.map(jnp.copy, variables)
  common = dict(train=splits.train, val=splits.val, batch_size=64, total_steps=STEPS,
                eval_batch_size=200, log_every=3, tensorboard=False)
  stacked = sweep_lib.stack(hps)
  swept = sweep_lib.run(search, stacked, sweep_lib.init(search, keys(), stacked, fresh()),
                        walls=walls, directory=str(tmp_path / "sweep"), **common)
  assert swept.trace_counts == {"train": 1, "eval": 1}
  states = _restore(tmp_path / "sweep", sweep_lib.init(search, keys(), stacked, fresh()))
  for k in range(len(hps)):
    start = lambda: search.init(keys()[k], hps[k], fresh())
    single = search_lib.run(search, hps[k], start(), wall=walls[k],
                            directory=str(tmp_path / f"single{k}"), **common)
    assert swept.policies[k].to_dict() == single.policy.to_dict(), k
    got, want = sweep_lib.member(states, k), _restore(tmp_path / f"single{k}", start())
    # The gradients agree to float precision (the test above), but Adam
    # normalises the logits' gradients, tiny ones included (|g| ~ 3e-5 for the
    # classifier's candidates), so float-level differences between the batched
    # and the single program grow there over the steps: 2e-2 is 20% of one
    # Adam step (arch_lr 0.1); through the mixtures the weights then move by
    # up to ~5e-5, and the BatchNorm statistics, averages of activations
    # computed with those weights, inherit their bound.
    for name, atol in (("logits", 2e-2), ("params", 2e-4), ("multiplier", 1e-5),
                       ("batch_stats", 2e-4)):
      jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol),
                   getattr(got, name), getattr(want, name))
    mine, theirs = swept.epochs[k][-1], single.epochs[-1]
    for key in ("w_bits", "a_bits", "argmax_w_bits", "argmax_a_bits", "cost", "limit"):
      assert mine[key] == theirs[key], (k, key)
    np.testing.assert_allclose(mine["val_top1"], theirs["val_top1"], atol=0.51)
  # The members differ: their budgets bind.
  assert len({p.to_dict()["layers"].__repr__() for p in swept.policies}) > 1


def test_spec_members_product_and_zip():
  spec = sweep_lib.SweepSpec.parse({"lambda": ["0.1", "1"], "budget": ["0.5", "0.7"]})
  assert [tuple(m.values()) for m in spec.members()] == [
      (0.1, 0.5), (0.1, 0.7), (1.0, 0.5), (1.0, 0.7)]
  spec = sweep_lib.SweepSpec.parse({"lambda": ["0.1"], "budget": ["0.5", "0.7"]},
                                   combine="zip")
  assert [tuple(m.values()) for m in spec.members()] == [(0.1, 0.5), (0.1, 0.7)]


def test_members_without_a_seed_axis_draw_their_own_keys():
  from haqjax.jobs import sweep as sweep_job  # pylint: disable=g-import-not-at-top
  budgets = sweep_lib.SweepSpec.parse({"budget": ["0.5", "0.7", "0.9"]}).members()
  keys = np.asarray(jax.random.key_data(sweep_job.member_keys(5, budgets)))
  assert len({tuple(k) for k in keys.reshape(len(budgets), -1)}) == len(budgets)
  # Two members, one budget: same hyper-parameters, yet their Gumbel noise differs.
  noise = [jax.random.gumbel(jax.random.fold_in(k, 0), (4, 6)) for k in
           sweep_job.member_keys(5, budgets[:1] * 2)]
  assert not np.allclose(noise[0], noise[1])
  # A swept seed is the key a standalone search with that --seed starts from.
  seeded = sweep_lib.SweepSpec.parse({"seed": ["3", "4"]}).members()
  np.testing.assert_array_equal(
      jax.random.key_data(sweep_job.member_keys(0, seeded)[1]),
      jax.random.key_data(jax.random.PRNGKey(4)))


def launch(*args, timeout=300):
  env_vars = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env_vars,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("sweep")


def _sweep_args(tmp, workdir):
  return ["experiments.sweep", "--flagfile=experiments/flags/digits.flags",
          "--mode=gumbel", f"--workdir={workdir}", f"--compilation_cache={tmp / 'jit'}",
          "--noprogress", "--gumbel_epochs=1", "--gumbel_warmup_epochs=0.25"]


_BAD_FLAGS = [
    ("--sweep.lamda=1", ("Unknown command line flag 'sweep.lamda'",)),
    ("--sweep.lambda=a,b", ("sweep.lambda=a,b", "comma-separated numbers")),
    ("", ("no sweep axis given", "--sweep.lambda")),
    ("--sweep.lambda=1,2 --sweep.budget=0.5,0.6,0.7 --sweep_combine=zip",
     ("sweep_combine='zip' needs axes of one length",)),
    ("--sweep.lambda=1 --sweep_combine=grid", ("sweep_combine='grid'", "product, zip")),
    ("--sweep.tau_min=9", ("sweep member tau_min=9", "gumbel_tau_min=9.0")),
    ("--sweep.budget=0.5,0.01", ("sweep member budget=0.01", "below the lowest cost")),
]


def _bad_workdir(tmp, flags):
  return tmp / f"bad{[f for f, _ in _BAD_FLAGS].index(flags)}"


@pytest.fixture(scope="module")
def bad_runs(tmp):
  """Each `_BAD_FLAGS` launch, in one `launch_many`: flags -> process."""
  cases = [[*_sweep_args(tmp, _bad_workdir(tmp, flags))[1:], *flags.split()]
           for flags, _ in _BAD_FLAGS]
  procs = launch_many(cases, module="experiments.sweep")
  return {flags: proc for (flags, _), proc in zip(_BAD_FLAGS, procs)}


@pytest.mark.parametrize("flags, fragments", _BAD_FLAGS)
def test_bad_sweep_flags_fail_with_one_line(tmp, bad_runs, flags, fragments):
  proc = bad_runs[flags]
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  assert not _bad_workdir(tmp, flags).exists()


def test_sweep_writes_table_and_pareto(tmp, tmp_path_factory):
  flags, fp32 = shared_digits(tmp_path_factory)
  # The shared prepared data and compilation cache.
  shared = [f for f in flags if f.startswith(("--data_dir=", "--compilation_cache="))]
  rl = tmp / "rl"
  rl.mkdir()
  (rl / "results.json").write_text(json.dumps(
      {"cost": 1e-5, "cost_ratio": 0.6, "test_top1": 50.0, "search_seconds": 9.0}))
  uniform = tmp / "uniform.json"
  uniform.write_text(json.dumps({"w2a2": 30.0, "w8a8": {"test_top1": 60.0}}))
  workdir = tmp / "run"
  proc = launch(*_sweep_args(tmp, workdir), *shared, f"--init_from={fp32}",
                "--sweep.budget=0.4,0.8", "--finetune_epochs=0.25",
                f"--uniform_results={uniform}", "--uniform_policies=w4a4",
                f"--rl_workdir={rl}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in (workdir / "sweep.jsonl").read_text().splitlines()]
  assert [r["member"] for r in rows] == [0, 1] and [r["budget"] for r in rows] == [0.4, 0.8]
  for r in rows:
    assert r["fits"] and r["cost_ratio"] <= r["budget"] + 1e-9
    assert 0 <= r["test_top1"] <= 100
  with open(workdir / "sweep.csv") as f:
    table = list(csv.DictReader(f))
  assert [float(r["cost"]) for r in table] == [r["cost"] for r in rows]
  assert (workdir / "plots" / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE
  results = json.loads((workdir / "results.json").read_text())
  assert results["trace_counts"] == {"train": 1, "eval": 1}
  assert [u["label"] for u in results["uniform"]] == ["w2a2", "w4a4", "w8a8"]
  assert results["others"][0]["group"] == "rl"
  assert "| member |" in proc.stdout
  for i in range(2):
    assert (workdir / "members" / f"m{i:02d}" / "finetune" / "results.json").exists()
