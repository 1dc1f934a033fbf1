r"""Training benchmark: step throughput and the quickstart recipe end to end.

  python -m experiments.bench train [--out=bench_train.json] [--steps=30] \
      [--batch_size=128] [--epochs=...] [--skip_accuracy]

Measures, on this machine:
  * training-step throughput (images/s at the median step time, with the
    fastest and slowest steps) and time to first step (compile) of the
    quickstart model (28x28x1) and ResNet-20 (32x32x3) at batch 128;
  * the quickstart recipe end to end, one run: FP32 test top-1 on
    Fashion-MNIST and the training wall time as the trainer measures it
    (target: >= 90% in <= 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import functools
import tempfile
import time

from experiments.bench import timing


def throughput(model_name: str, input_shape: tuple[int, ...], num_classes: int,
               batch_size: int, steps: int) -> dict:
  """Timed training steps of `model_name` on one random batch."""
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
  current = [state]

  def one_step():
    current[0], metrics = step(current[0], batch, None)
    return current[0], metrics

  t = timing.time_call(one_step, repeats=steps)
  return {"model": model_name, "input_shape": list(input_shape), "batch_size": batch_size,
          "images_per_second": round(batch_size / t.median, 1),
          "step_ms": round(t.median_ms, 2), "step_min_ms": round(t.min_ms, 2),
          "step_max_ms": round(t.max_ms, 2), "timed_steps": t.repeats,
          "first_step_seconds": round(t.first_seconds, 3)}


def run(steps: int = 30, batch_size: int = 128, epochs: float | None = None,
        skip_accuracy: bool = False, data_dir: str | None = None) -> dict:
  """Runs the benchmark; prints a summary and returns a JSON-able dict.

  Args:
    steps: timed training steps per model.
    batch_size: batch size of the throughput runs.
    epochs: the quickstart run's epochs (None: the recipe's).
    skip_accuracy: only measure throughput, not the quickstart run.
    data_dir: prepared datasets folder.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top

  if steps < timing.MIN_REPEATS:
    raise ValueError(f"steps={steps}; allowed: >= {timing.MIN_REPEATS} (timed steps "
                     "give a median, a min and a max)")
  result = {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": jax.device_count()}
  result["throughput"] = [
      throughput("quickstart_cnn", (28, 28, 1), 10, batch_size, steps),
      throughput("resnet20", (32, 32, 3), 10, batch_size, steps)]
  for r in result["throughput"]:
    print(f"{r['model']:>15}: {r['images_per_second']:>9,.0f} images/s at batch "
          f"{r['batch_size']} (median step {r['step_ms']:.2f} ms, min "
          f"{r['step_min_ms']:.2f}, max {r['step_max_ms']:.2f} over {r['timed_steps']}), "
          f"first step {r['first_step_seconds']:.1f} s", flush=True)
  if not skip_accuracy:
    overrides = {"progress": False, "tensorboard": False, "data_dir": data_dir}
    if epochs:
      overrides["epochs"] = epochs
    config = recipes.load_recipe("quickstart", **overrides)
    with tempfile.TemporaryDirectory() as workdir:
      t0 = time.perf_counter()
      run_results = trainer.train_and_evaluate(config, workdir)
      wall = time.perf_counter() - t0
    result["quickstart"] = {
        "recipe": "experiments/flags/quickstart.flags", "epochs": config.epochs,
        "runs": 1, "test_top1": round(run_results["test_top1"], 2),
        "val_top1": run_results["val_top1"],
        "train_seconds": round(run_results["train_seconds"], 1),
        "wall_seconds": round(wall, 1),
        "train_images_per_second": run_results["train_images_per_second"],
        "target": ">= 90% test top-1 within 300 s of training",
        "met": bool(run_results["test_top1"] >= 90.0
                    and run_results["train_seconds"] <= 300)}
    print(f"quickstart (one run): test top-1 {run_results['test_top1']:.2f}% after "
          f"{run_results['train_seconds']:.0f} s of training ({wall:.0f} s wall)",
          flush=True)
  return result
