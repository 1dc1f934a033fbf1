r"""PTQ benchmark: the whole flow and AdaRound per layer on the quickstart model.

  python -m experiments.bench ptq [--init_from=FP32_WORKDIR] [--out=bench_ptq.json]

Restores the FP32 quickstart model of `--init_from` (or trains one for 2
epochs in a temporary folder), then runs the full PTQ flow (BN folding, CLE,
MSE ranges, AdaRound with its default iterations, MSE activation ranges) at
W4A8 on 1,024 training images, twice: the first run includes compilation, the
second shows the steady state. Target: the flow in <= 60 s on a 2-core CPU.
"""

from __future__ import annotations

import tempfile
import time


def run(init_from: str | None = None, data_dir: str | None = None) -> dict:
  """Runs the benchmark; prints a summary and returns a JSON-able dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  from haqjax.ptq import pipeline  # pylint: disable=g-import-not-at-top
  from haqjax.ptq import runner  # pylint: disable=g-import-not-at-top
  from haqjax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    if not init_from:
      init_from = tmp
      trainer.train_and_evaluate(recipes.load_recipe(
          "quickstart", epochs=2, progress=False, tensorboard=False, data_dir=data_dir), tmp)
    config = recipes.load_recipe("quickstart_ptq", init_from=init_from, data_dir=data_dir)
    splits = haq_data.load(config.dataset, data_dir=data_dir, val_size=config.val_size,
                           split_seed=config.split_seed)
    model = trainer.build_model(config.replace(mode="train"), splits.spec.num_classes)
    names = layer_table(model, (1, *splits.spec.image_shape)).names
    variables = jax.tree.map(jnp.asarray, ckpt_lib.restore_variables(init_from))
  batches = runner.calibration_batches(splits, config)
  policy = Policy.uniform(names, 4, 8)
  options = runner.options_from_config(config)
  runs = []
  for attempt in ("first (with compilation)", "second"):
    t0 = time.perf_counter()
    result = pipeline.ptq(jax.random.key(0), model, variables, batches, policy, options)
    wall = time.perf_counter() - t0
    runs.append({"run": attempt, "wall_seconds": round(wall, 2),
                 "step_seconds": result.report["seconds"],
                 "adaround_layer_seconds": result.report["adaround_layer_seconds"]})
    print(f"PTQ flow, {attempt}: {wall:.1f} s (AdaRound "
          f"{result.report['seconds']['adaround']:.1f} s over {len(names)} layers)",
          flush=True)
  evaluate = trainer.Evaluator(result.model, None, config.eval_batch_size)
  top1 = evaluate(result.variables, splits.test, policy)["top1"]
  fp32 = trainer.Evaluator(model, None, config.eval_batch_size)(variables, splits.test,
                                                                 None)["top1"]
  print(f"W4A8 PTQ test top-1 {top1:.2f}% (FP32 {fp32:.2f}%)", flush=True)
  return {"model": config.model, "policy": "w4a8", "calibration_images": 1024,
          "adaround_iters": config.adaround_iters, "runs": runs,
          "test_top1": top1, "fp32_test_top1": fp32,
          "target": "full PTQ flow with AdaRound on 1,024 images <= 60 s",
          "met": bool(runs[0]["wall_seconds"] <= 60)}
