r"""PTQ benchmark: the whole flow and AdaRound per layer on the quickstart model.

  python -m experiments.bench ptq [--init_from=FP32_WORKDIR] [--out=bench_ptq.json]

Restores the FP32 quickstart model of `--init_from` (or trains one for 2
epochs in a temporary folder), then runs the full PTQ flow (BN folding, CLE,
MSE ranges, AdaRound with its default iterations, MSE activation ranges) at
W4A8 on 1,024 training images, `repeats` + 1 times: the first run includes
compilation, the others give the steady state (median, min, max). Target:
the first run in <= 60 s on a 2-core CPU.
"""

from __future__ import annotations

import tempfile

from experiments.bench import timing


def run(init_from: str | None = None, data_dir: str | None = None,
        repeats: int = timing.MIN_REPEATS) -> dict:
  """Runs the benchmark; prints a summary and returns a JSON-able dict.

  Args:
    init_from: the FP32 quickstart workdir (None: train one for 2 epochs).
    data_dir: prepared datasets folder.
    repeats: timed runs of the flow after the first (compiling) one.
  """
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
  results = []

  def flow():
    results.append(pipeline.ptq(jax.random.key(0), model, variables, batches, policy,
                                options))
    return results[-1].variables

  t = timing.time_call(flow, repeats=repeats)
  runs = [{"run": "first (with compilation)" if i == 0 else f"repeat {i}",
           "step_seconds": r.report["seconds"],
           "adaround_layer_seconds": r.report["adaround_layer_seconds"]}
          for i, r in enumerate(results)]
  result = results[-1]
  print(f"PTQ flow: first run (with compilation) {t.first_seconds:.1f} s; then median "
        f"{t.median:.1f} s (min {t.min:.1f}, max {t.max:.1f}) over {t.repeats} runs "
        f"(AdaRound {result.report['seconds']['adaround']:.1f} s over {len(names)} layers "
        "in the last)", flush=True)
  evaluate = trainer.Evaluator(result.model, None, config.eval_batch_size)
  top1 = evaluate(result.variables, splits.test, policy)["top1"]
  fp32 = trainer.Evaluator(model, None, config.eval_batch_size)(variables, splits.test,
                                                                 None)["top1"]
  print(f"W4A8 PTQ test top-1 {top1:.2f}% (FP32 {fp32:.2f}%)", flush=True)
  return {"model": config.model, "policy": "w4a8", "calibration_images": 1024,
          "adaround_iters": config.adaround_iters, "flow_seconds": t.to_dict("s", 2),
          "runs": runs, "test_top1": top1, "fp32_test_top1": fp32,
          "target": "full PTQ flow with AdaRound on 1,024 images <= 60 s",
          "met": bool(t.first_seconds <= 60)}
