r"""Benchmarks: programs that print and write JSON, not timed tests.

  python -m experiments.bench train [--out=bench_train.json] [--epochs=...]
  python -m experiments.bench quant [--out=bench_quant.json]
  python -m experiments.bench hardware [--out=bench_hardware.json]
  python -m experiments.bench ptq [--init_from=FP32_WORKDIR] [--out=bench_ptq.json]
  python -m experiments.bench search-rl [--init_from=FP32_WORKDIR] [--episodes=12] \
      [--out=bench_search-rl.json]
  python -m experiments.bench search-gumbel [--init_from=FP32_WORKDIR] \
      [--rl_workdir=RL_WORKDIR] [--gumbel_recipes=quickstart_sweep] [--sweep_members=8] \
      [--sweep_steps=40] [--out=bench_search-gumbel.json]

`quant`, `hardware`, `ptq`, `search-rl` and `search-gumbel` are described in
`experiments/bench_quant.py`, `experiments/bench_hardware.py`,
`experiments/bench_ptq.py`, `experiments/bench_search.py` and
`experiments/bench_gumbel.py`.

`train` measures, on this machine:
  * training-step throughput (images/s) and time to first step (compile) of
    the quickstart model (28x28x1) and ResNet-20 (32x32x3) at batch 128;
  * the quickstart recipe end to end: FP32 test top-1 on Fashion-MNIST and the
    training wall time (target: >= 90% in <= 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import functools
import importlib
import os
import platform
import sys
import tempfile
import time

from absl import flags

from experiments import cli

_OUT = flags.DEFINE_string("out", None, "JSON output path (default bench_<name>.json).")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed training steps per model.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size of the throughput runs.")
_EPOCHS = flags.DEFINE_float("epochs", None, "Override the quickstart recipe's epochs.")
_SKIP_ACCURACY = flags.DEFINE_bool("skip_accuracy", False,
                                   "Only measure throughput, not the quickstart run.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared datasets folder.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "ptq, search-rl: the FP32 "
                                 "quickstart workdir (default: train one).")
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
_MAX_SEARCH = flags.DEFINE_float("max_search_seconds", 240.0, "search-gumbel: project "
                                 "a recipe's search instead of running it above this.")
_CACHE = flags.DEFINE_string("compilation_cache", "",
                             "JAX persistent compilation cache ('' disables, so "
                             "time to first step includes compilation).")

BENCHMARKS = ("train", "quant", "hardware", "ptq", "search-rl", "search-gumbel")
# Benchmark name -> module, where they differ.
_MODULES = {"search-rl": "experiments.bench_search",
            "search-gumbel": "experiments.bench_gumbel"}


def _throughput(model_name: str, input_shape, num_classes: int, batch_size: int,
                steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from haqjax import models  # pylint: disable=g-import-not-at-top
  from haqjax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  model = models.create(model_name, num_classes=num_classes)
  tx = steps_lib.make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9,
                                weight_decay=1e-4)
  state = steps_lib.init_state(jax.random.key(0), model, tx, (1, *input_shape))
  key_x, key_y = jax.random.split(jax.random.key(1))
  batch = {"image": jax.random.normal(key_x, (batch_size, *input_shape)),
           "label": jax.random.randint(key_y, (batch_size,), 0, num_classes)}
  step = jax.jit(functools.partial(steps_lib.train_step, model, tx), donate_argnums=0)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, None)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  for _ in range(3):
    state, metrics = step(state, batch, None)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, None)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - t0
  return {"model": model_name, "input_shape": list(input_shape), "batch_size": batch_size,
          "images_per_second": round(steps * batch_size / seconds, 1),
          "step_ms": round(1000 * seconds / steps, 2),
          "first_step_seconds": round(first, 3)}


def bench_train() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top

  result = {"benchmark": "train", "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": jax.device_count()}
  result["throughput"] = [
      _throughput("quickstart_cnn", (28, 28, 1), 10, _BATCH.value, _STEPS.value),
      _throughput("resnet20", (32, 32, 3), 10, _BATCH.value, _STEPS.value)]
  for r in result["throughput"]:
    print(f"{r['model']:>15}: {r['images_per_second']:>9,.0f} images/s at batch "
          f"{r['batch_size']}, first step {r['first_step_seconds']:.1f} s", flush=True)
  if not _SKIP_ACCURACY.value:
    overrides = {"progress": False, "tensorboard": False, "data_dir": _DATA_DIR.value}
    if _EPOCHS.value:
      overrides["epochs"] = _EPOCHS.value
    config = recipes.load_recipe("quickstart", **overrides)
    with tempfile.TemporaryDirectory() as workdir:
      t0 = time.perf_counter()
      run = trainer.train_and_evaluate(config, workdir)
      wall = time.perf_counter() - t0
    result["quickstart"] = {
        "recipe": "experiments/flags/quickstart.flags", "epochs": config.epochs,
        "test_top1": round(run["test_top1"], 2), "val_top1": run["val_top1"],
        "train_seconds": round(run["train_seconds"], 1), "wall_seconds": round(wall, 1),
        "train_images_per_second": run["train_images_per_second"],
        "target": ">= 90% test top-1 within 300 s of training",
        "met": bool(run["test_top1"] >= 90.0 and run["train_seconds"] <= 300)}
    print(f"quickstart: test top-1 {run['test_top1']:.2f}% after "
          f"{run['train_seconds']:.0f} s of training ({wall:.0f} s wall)", flush=True)
  return result


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    got = " ".join(argv[1:]) or "nothing"
    raise ValueError(f"benchmark name is {got!r}; allowed: {', '.join(BENCHMARKS)}")
  cli.enable_compilation_cache(_CACHE.value)
  name = argv[1]
  if name == "train":
    result = bench_train()
  else:
    module = importlib.import_module(_MODULES.get(name, f"experiments.bench_{name}"))
    kwargs = ({"init_from": _INIT_FROM.value, "data_dir": _DATA_DIR.value}
              if name in ("ptq", "search-rl", "search-gumbel") else {})
    if name == "search-rl":
      kwargs["episodes"] = _EPISODES.value
    if name == "search-gumbel":
      kwargs.update(rl_workdir=_RL_WORKDIR.value, recipes_=tuple(_GUMBEL_RECIPES.value),
                    members=_SWEEP_MEMBERS.value, sweep_steps=_SWEEP_STEPS.value,
                    max_search_seconds=_MAX_SEARCH.value)
    result = {"benchmark": name, "machine": platform.platform(),
              "cpu_count": os.cpu_count(), **module.run(**kwargs)}
  out = _OUT.value or f"bench_{name}.json"
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  haq_io.write_json(out, result)
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
