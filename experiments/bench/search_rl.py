r"""HAQ search benchmark: the DDPG agent's steps and the real search on the quickstart.

  python -m experiments.bench search-rl [--init_from=FP32_WORKDIR] [--episodes=12] \
      [--out=bench_search-rl.json]

Restores the FP32 quickstart model of `--init_from` (or trains one for 2
epochs in a temporary folder) and measures, with the settings of
`experiments/flags/quickstart_rl.flags`:

  * the agent (300-300 actor and critic): one jitted `update_step` on 64
    transitions and one `observe` of a whole episode (store each transition,
    one update after each), median (with min and max) over many calls after
    compilation (`timing.time_call`);
  * the real search (`haqjax.search.rl.run` with the QAT scorer) over
    `--episodes` episodes, half warm-up and half learning, each split into
    agent rollout, scoring, agent observe and the rest (budget wall, records,
    the synchronous checkpoint, logs);
  * how often the scorer's fine-tune and eval steps and the agent's rollout
    and observe were traced (1 each, whatever the policies and episodes);
  * the quickstart search's projected time (its `search_episodes`, with its
    warm-up, at the measured episode times). Target: <= 10 minutes on 2 CPU
    cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Any
from unittest import mock

from experiments.bench import timing

RECIPE = "quickstart_rl"
TARGET_SECONDS = 600.0


def rl_recipe(name: str = RECIPE, **overrides: Any):
  """`(Config, SearchConfig)` of an `rl` recipe; overrides go to either."""
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  return recipes.read_configs(name, (Config, SearchConfig), **overrides)


def fp32_val_top1(config, search, splits, fp32_dir: str) -> float:
  """The FP32 run's top-1 on the search's held-out split.

  Its recorded `val_top1` when the search scores on the whole validation
  split, else measured on the subset.
  """
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  path = os.path.join(fp32_dir, "results.json")
  if os.path.exists(path) and not search.search_val_size:
    with open(path) as f:
      value = json.load(f).get("val_top1")
    if value is not None:
      return value
  return stages.fp32_top1(config, splits, search, fp32_dir)


def bench_agent(ddpg_config, state_dim: int, steps: int, batch_size: int = 64) -> dict:
  """First-call (compile) and median, min and max times of the agent's jitted steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from haqjax.search.rl import learning  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(ddpg_config, batch_size=batch_size, warmup_episodes=0)
  agent = learning.DDPG(config, state_dim=state_dim, steps_per_episode=steps)
  state = agent.init(jax.random.PRNGKey(0))
  embedding = jax.random.uniform(jax.random.PRNGKey(1), (steps, state_dim))
  ks = jax.random.split(jax.random.PRNGKey(2), 5)
  batch = learning.Transition(
      state=jax.random.uniform(ks[0], (batch_size, state_dim)),
      action=jax.random.uniform(ks[1], (batch_size, 1)),
      reward=jax.random.normal(ks[2], (batch_size,)),
      next_state=jax.random.uniform(ks[3], (batch_size, state_dim)),
      done=(jax.random.uniform(ks[4], (batch_size,)) < 1 / steps).astype(jnp.float32))
  out = {"hidden": list(config.hidden), "batch_size": batch_size,
         "steps_per_episode": steps}
  for name, call, calls in (
      ("update_step", lambda s: agent.update_step(s, batch), 300),
      ("rollout", lambda s: agent.rollout(s, embedding, 5), 100),
      ("observe", lambda s: agent.observe(
          s, learning.episode_transitions(embedding, embedding[:, :1], -1.0), True), 50)):
    t = timing.time_call(lambda: call(state), repeats=calls)  # pylint: disable=cell-var-from-loop
    out[name] = {**t.to_dict("ms", 3), "calls": calls}
  out["observe"]["updates"] = steps
  return out


class _TimedScorer:
  """The scorer, with the start and duration of every call recorded."""

  def __init__(self, scorer):
    self.scorer = scorer
    self.calls: list[tuple[float, float]] = []

  def __call__(self, policy):
    t0 = time.perf_counter()
    metrics = self.scorer(policy)
    self.calls.append((t0, time.perf_counter() - t0))
    return metrics

  def trace_counts(self) -> dict[str, int]:
    return self.scorer.trace_counts()


def _counting_agent_class():
  """A `DDPG` whose rollout and observe count their traces and time their calls."""
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax.search.rl import learning  # pylint: disable=g-import-not-at-top

  class CountingDDPG(learning.DDPG):
    instances: list[CountingDDPG] = []

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.traces = {"rollout": 0, "observe": 0}
      self.seconds: dict[str, list[float]] = {"rollout": [], "observe": []}
      for name, fn in (("rollout", self._rollout), ("observe", self._observe)):
        setattr(self, name, self._timed(name, jax.jit(self._counted(name, fn))))
      CountingDDPG.instances.append(self)

    def _counted(self, name, fn):
      def traced(*args):
        self.traces[name] += 1
        return fn(*args)
      return traced

    def _timed(self, name, jitted):
      def call(*args):
        t0 = time.perf_counter()
        out = jax.block_until_ready(jitted(*args))
        self.seconds[name].append(time.perf_counter() - t0)
        return out
      call.jitted = jitted
      return call

  return CountingDDPG


def _median(xs):
  return round(statistics.median(xs), 3) if xs else None


def bench_search(config, search, splits, fp32_dir: str, fp32_val: float, table,
                 episodes: int, workdir: str) -> dict:
  """The real search for `episodes` episodes, timed by part."""
  from haqjax.jobs import rl as rl_job  # pylint: disable=g-import-not-at-top
  from haqjax.search import scoring  # pylint: disable=g-import-not-at-top
  from haqjax.search.rl import learning  # pylint: disable=g-import-not-at-top
  from haqjax.search.rl import search as rl_search  # pylint: disable=g-import-not-at-top

  warmup = max(1, episodes // 2)
  run_search = search.replace(search_episodes=episodes,
                              ddpg=search.ddpg.replace(warmup_episodes=warmup))
  t0 = time.perf_counter()
  scorer = _TimedScorer(rl_job.make_scorer(config, run_search, splits, fp32_dir))
  scorer_seconds = time.perf_counter() - t0
  problem = rl_job.build_problem(config, run_search, table, fp32_val)
  agent_class = _counting_agent_class()
  t0 = time.perf_counter()
  with mock.patch.object(learning, "DDPG", agent_class):
    result = rl_search.run(problem, scorer, workdir, tensorboard=config.tensorboard)
  search_seconds = time.perf_counter() - t0
  agent = agent_class.instances[-1]
  records = result.records
  starts = [s - r for (s, _), r in zip(scorer.calls, agent.seconds["rollout"])]
  ends = starts[1:] + [t0 + search_seconds]
  rows = []
  for i, r in enumerate(records):
    # The episode's own parts, then what follows it until the next one starts
    # (checkpoint, episodes.jsonl, metrics); the first episode also compiles.
    rollout, observe = agent.seconds["rollout"][i], agent.seconds["observe"][i]
    score_s = scorer.calls[i][1]
    period = ends[i] - starts[i]
    rows.append({"episode": i, "warmup": r["warmup"], "top1": r["top1"],
                 "reward": r["reward"], "seconds": r["seconds"], "period": period,
                 "rollout": rollout, "scoring": score_s, "observe": observe,
                 "rest": period - rollout - score_s - observe})

  def summary(selected):
    return {k: _median([row[k] for row in selected])
            for k in ("period", "rollout", "scoring", "observe", "rest")}

  parts = {"first": summary(rows[:1]),
           "warmup": summary([r for r in rows[1:] if r["warmup"]]),
           "learning": summary([r for r in rows if not r["warmup"]])}
  # pylint: disable=protected-access
  counts = {**{f"scorer_{k}": v for k, v in scorer.trace_counts().items()},
            **{f"agent_{k}": v for k, v in agent.traces.items()},
            **{f"agent_{k}_cache_size": getattr(agent, k).jitted._cache_size()
               for k in ("rollout", "observe")}}
  # pylint: enable=protected-access
  return {"episodes": episodes, "warmup_episodes": warmup,
          "finetune_steps": search.search_finetune_steps,
          "val_examples": len(scoring.subset(splits.val, search.search_val_size)),
          "scorer_build_seconds": round(scorer_seconds, 2),
          "search_seconds": round(search_seconds, 2),
          "episodes_per_minute": round(60 * episodes / search_seconds, 2),
          "steady_episodes_per_minute": round(60 / parts["learning"]["period"], 2),
          "median_seconds_by_part": parts, "trace_counts": counts,
          "best": {"episode": result.best["episode"], "top1": result.best["top1"],
                   "cost_ratio": result.best["cost_ratio"]},
          "per_episode": [{k: round(v, 4) if isinstance(v, float) else v
                           for k, v in row.items()} for row in rows]}


def _print(agent: dict, search: dict, projection: dict) -> None:
  print(f"DDPG agent ({'-'.join(map(str, agent['hidden']))}), median after compile:")
  for name, what in (("update_step", f"batch of {agent['batch_size']}"),
                     ("observe", f"{agent['steps_per_episode']} transitions, "
                                 f"{agent['observe']['updates']} updates"),
                     ("rollout", f"{agent['steps_per_episode']} steps")):
    r = agent[name]
    print(f"  {name:<12} {what:<30} {r['median_ms']:>8.2f} ms (min {r['min_ms']:.2f}, "
          f"max {r['max_ms']:.2f}; first call {r['first_call_seconds']:.2f} s)")
  print(f"Search: {search['episodes']} episodes ({search['warmup_episodes']} warm-up), QAT "
        f"scorer with {search['finetune_steps']} steps, {search['val_examples']} val images")
  print(f"  {'median s':<10}{'period':>9}{'rollout':>9}{'scoring':>9}{'observe':>9}"
        f"{'rest':>9}")
  for name, p in search["median_seconds_by_part"].items():
    print(f"  {name:<10}" + "".join(
        f"{p[k]:>9.3f}" if p[k] is not None else f"{'-':>9}"
        for k in ("period", "rollout", "scoring", "observe", "rest")))
  print(f"  {search['search_seconds']:.1f} s in all ({search['episodes_per_minute']:.1f} "
        f"episodes/min; {search['steady_episodes_per_minute']:.1f}/min after compile), "
        f"scorer built in {search['scorer_build_seconds']:.1f} s")
  print("  traces: " + ", ".join(f"{k} {v}" for k, v in search["trace_counts"].items()))
  print(f"Projected quickstart search ({projection['episodes']} episodes, "
        f"{projection['warmup_episodes']} warm-up): {projection['seconds']:.0f} s "
        f"({projection['seconds'] / 60:.1f} min; target <= {TARGET_SECONDS / 60:.0f} min: "
        f"{'met' if projection['met'] else 'NOT met'})", flush=True)


def run(init_from: str | None = None, data_dir: str | None = None,
        episodes: int = 12) -> dict:
  """Runs the benchmark; prints a summary and returns a JSON-able dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.search import env as env_lib  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top

  if episodes < 2:
    raise ValueError(f"episodes={episodes}; allowed: >= 2 (warm-up and learning)")
  from experiments import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_libraries()  # No orbax line per checkpoint.
  config, search = rl_recipe(data_dir=data_dir, progress=False)
  with tempfile.TemporaryDirectory() as tmp:
    if not init_from:
      init_from = os.path.join(tmp, "fp32")
      trainer.train_and_evaluate(recipes.load_recipe(
          "quickstart", epochs=2, progress=False, tensorboard=False, data_dir=data_dir),
          init_from)
    config = config.replace(init_from=init_from)
    splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                           val_size=config.val_size, split_seed=config.split_seed)
    model = trainer.build_model(config.replace(mode="train"), splits.spec.num_classes)
    table = layer_table(model, (1, *splits.spec.image_shape))
    observations = env_lib.observations(table, search.quantization)
    agent = bench_agent(search.ddpg, observations.shape[1], observations.shape[0])
    fp32_val = fp32_val_top1(config, search, splits, init_from)
    measured = bench_search(config, search, splits, init_from, float(fp32_val), table,
                            episodes, os.path.join(tmp, "search"))
  parts = measured["median_seconds_by_part"]
  n, w = search.search_episodes, min(search.ddpg.warmup_episodes, search.search_episodes)
  seconds = (measured["scorer_build_seconds"] + parts["first"]["period"]
             + max(w - 1, 0) * parts["warmup"]["period"]
             + (n - max(w, 1)) * parts["learning"]["period"])
  projection = {"recipe": f"experiments/flags/{RECIPE}.flags", "episodes": n,
                "warmup_episodes": w, "seconds": round(seconds, 1),
                "formula": "scorer build + first episode + warm-up x median warm-up "
                           "episode + rest x median learning episode",
                "target": f"quickstart search <= {TARGET_SECONDS:.0f} s on 2 CPU cores",
                "met": bool(seconds <= TARGET_SECONDS)}
  _print(agent, measured, projection)
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "model": config.model, "dataset": config.dataset, "target": search.target,
          "budget": str(search.budget_spec()), "fp32_val_top1": fp32_val,
          "agent": agent, "search": measured, "projection": projection}
