r"""Benchmarks: programs that print and write JSON, not timed tests.

  python -m experiments.bench train [--out=bench_train.json] [--steps=30] \
      [--batch_size=128] [--epochs=...] [--skip_accuracy]
  python -m experiments.bench quant [--out=bench_quant.json]
  python -m experiments.bench quant-codebook [--out=bench_quant-codebook.json]
  python -m experiments.bench hardware [--out=bench_hardware.json]
  python -m experiments.bench ptq [--init_from=FP32_WORKDIR] [--out=bench_ptq.json]
  python -m experiments.bench search-rl [--init_from=FP32_WORKDIR] [--episodes=12] \
      [--out=bench_search-rl.json]
  python -m experiments.bench search-gumbel [--init_from=FP32_WORKDIR] \
      [--rl_workdir=RL_WORKDIR] [--gumbel_recipes=quickstart_sweep] [--sweep_members=8] \
      [--sweep_steps=40] [--sweep_repeats=3] [--out=bench_search-gumbel.json]
  python -m experiments.bench searches [--init_from=FP32_WORKDIR] \
      [--quantizer=minmax|lsq] [--nofronts] [--quick] [--out=bench_searches.json]
  python -m experiments.bench mobilenet [--out=bench_mobilenet.json] [--quick]
  python -m experiments.bench deploy [--out=bench_deploy.json] [--quick]

Each benchmark is a module of this package (`train`, `quant`,
`quant_codebook`, `hardware`, `ptq`, `search_rl`, `search_gumbel`, `searches`,
`mobilenet`, `deploy`) whose docstring says what it measures and what it should give;
times are `timing.time_call`'s median with min and max, compilation apart.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys

from absl import flags

from experiments import cli

_OUT = flags.DEFINE_string("out", None, "JSON output path (default bench_<name>.json).")
_STEPS = flags.DEFINE_integer("steps", 30, "train: timed training steps per model.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "train: batch size of the throughput "
                              "runs.")
_EPOCHS = flags.DEFINE_float("epochs", None, "train: override the quickstart recipe's "
                             "epochs.")
_SKIP_ACCURACY = flags.DEFINE_bool("skip_accuracy", False,
                                   "train: only measure throughput, not the quickstart run.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared datasets folder.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "ptq, search-rl, search-gumbel, "
                                 "searches: the FP32 quickstart workdir (default: train "
                                 "one).")
_EPISODES = flags.DEFINE_integer("episodes", 12, "search-rl: episodes of the timed search.")
_RL_WORKDIR = flags.DEFINE_string("rl_workdir", None, "search-gumbel: a finished RL "
                                  "job at the same budget (default: bench search-rl's "
                                  "projection).")
_GUMBEL_RECIPES = flags.DEFINE_list("gumbel_recipes", ["quickstart_sweep"],
                                    "search-gumbel: recipes whose search is timed.")
_SWEEP_MEMBERS = flags.DEFINE_integer("sweep_members", 8, "search-gumbel: K of the "
                                      "vmapped sweep.")
_SWEEP_STEPS = flags.DEFINE_integer("sweep_steps", 40, "search-gumbel: steps of each "
                                    "search of the sweep comparison.")
_SWEEP_REPEATS = flags.DEFINE_integer("sweep_repeats", 3, "search-gumbel: rounds of the "
                                      "steady-state and repeats of the whole-run "
                                      "comparison (order alternated).")
_MAX_SEARCH = flags.DEFINE_float("max_search_seconds", 240.0, "search-gumbel: project "
                                 "a recipe's search instead of running it above this.")
_QUICK = flags.DEFINE_bool("quick", False, "mobilenet, deploy: batch 4 and 3 timed "
                           "steps, a smoke run; searches: every stage at toy size.")
_QUANTIZER = flags.DEFINE_enum("quantizer", "minmax", ["minmax", "lsq"], "searches: "
                                "the quantizers of every family and uniform point.")
_FRONTS = flags.DEFINE_bool("fronts", True, "searches: also the HAWQ front and the Gumbel "
                            "sweep's (16 more fine-tunes).")
_CURVATURE = flags.DEFINE_enum("hawq_curvature", "gauss_newton", ["gauss_newton", "hessian"],
                               "searches: what HAWQ and greedy take the layer traces "
                               "of (HawqConfig.hawq_curvature).")
_CACHE = flags.DEFINE_string("compilation_cache", "",
                             "JAX persistent compilation cache ('' disables, so "
                             "time to first step includes compilation).")

# Benchmark name -> its module in this package.
MODULES = {"train": "train", "quant": "quant", "quant-codebook": "quant_codebook",
           "hardware": "hardware", "ptq": "ptq", "search-rl": "search_rl",
           "searches": "searches",
           "search-gumbel": "search_gumbel", "mobilenet": "mobilenet", "deploy": "deploy"}
BENCHMARKS = tuple(MODULES)


def kwargs_for(name: str) -> dict:
  """The flags benchmark `name`'s `run` takes."""
  if name == "train":
    return {"steps": _STEPS.value, "batch_size": _BATCH.value, "epochs": _EPOCHS.value,
            "skip_accuracy": _SKIP_ACCURACY.value, "data_dir": _DATA_DIR.value}
  if name == "ptq":
    return {"init_from": _INIT_FROM.value, "data_dir": _DATA_DIR.value}
  if name == "search-rl":
    return {"init_from": _INIT_FROM.value, "data_dir": _DATA_DIR.value,
            "episodes": _EPISODES.value}
  if name == "search-gumbel":
    return {"init_from": _INIT_FROM.value, "data_dir": _DATA_DIR.value,
            "rl_workdir": _RL_WORKDIR.value, "recipes_": tuple(_GUMBEL_RECIPES.value),
            "members": _SWEEP_MEMBERS.value, "sweep_steps": _SWEEP_STEPS.value,
            "max_search_seconds": _MAX_SEARCH.value,
            "sweep_repeats": _SWEEP_REPEATS.value}
  if name == "searches":
    return {"init_from": _INIT_FROM.value, "data_dir": _DATA_DIR.value,
            "quantizer": _QUANTIZER.value, "quick": _QUICK.value, "fronts": _FRONTS.value,
            "curvature": _CURVATURE.value}
  if name in ("mobilenet", "deploy"):
    return {"quick": _QUICK.value}
  return {}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    got = " ".join(argv[1:]) or "nothing"
    raise ValueError(f"benchmark name is {got!r}; allowed: {', '.join(BENCHMARKS)}")
  cli.enable_compilation_cache(_CACHE.value)
  name = argv[1]
  module = importlib.import_module(f"experiments.bench.{MODULES[name]}")
  result = {"benchmark": name, "machine": platform.platform(),
            "cpu_count": os.cpu_count(), **module.run(**kwargs_for(name))}
  out = _OUT.value or f"bench_{name}.json"
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  haq_io.write_json(out, result)
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
