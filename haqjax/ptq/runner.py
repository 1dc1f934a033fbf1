"""`ptq_and_evaluate(config, workdir)`: the launcher's `ptq` mode.

Restores the FP32 model of `config.init_from`, runs the PTQ flow under
`config.policy` on `config.calibration_size` training images (never the
validation or test split), evaluates the quantized model on the validation
and test splits, and writes `config.json`, `policy.json`, `ptq.json` (the
report of each step) and `results.json` in the workdir. A rerun recomputes
(PTQ takes about a minute); results are written atomically.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from haqjax import data as haq_data
from haqjax import io as haq_io
from haqjax.nn import layer_table
from haqjax.policy import save_policy
from haqjax.ptq import pipeline
from haqjax.train import checkpoint as ckpt_lib
from haqjax.train import trainer
from haqjax.train.config import Config


def options_from_config(config: Config) -> pipeline.PTQOptions:
  """The PTQ steps a launcher config asks for."""
  return pipeline.PTQOptions(
      cle=config.ptq_cle, high_bias_absorption=config.ptq_cle, relu6=config.ptq_relu6,
      weight_range=config.ptq_weight_range, adaround=config.ptq_adaround,
      adaround_iters=config.adaround_iters, bias_correction=config.ptq_bias_correction,
      act_range=config.ptq_act_range)


def calibration_batches(splits, config: Config) -> list[dict[str, Any]]:
  """`config.calibration_size` shuffled training images, in batches."""
  batch_size = config.batch_size
  if config.calibration_size < batch_size:
    raise ValueError(f"calibration_size={config.calibration_size} is smaller than one "
                     f"batch (batch_size={batch_size}); allowed: >= batch_size")
  if config.calibration_size > len(splits.train):
    raise ValueError(f"calibration_size={config.calibration_size}: the training split "
                     f"has {len(splits.train)} examples; allowed: at most that many")
  count = math.ceil(config.calibration_size / batch_size)
  out = []
  for batch in haq_data.batches(splits.train, batch_size=batch_size, seed=config.seed,
                                epoch=0, shuffle=True, drop_remainder=True):
    out.append({"image": jnp.asarray(batch["image"])})
    if len(out) == count:
      break
  return out


def ptq_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Post-training quantization of `config.init_from` under `config.policy`.

  Returns:
    The metrics written to `results.json`.

  Raises:
    ValueError: as `run`.
  """
  return run(config, workdir)[0]


def run(config: Config, workdir: str) -> tuple[dict[str, Any], pipeline.PTQResult]:
  """`ptq_and_evaluate`, also returning the quantized model and its variables.

  A job that exports the integer model takes them from here rather than
  repeating the PTQ flow.

  Returns:
    `(results, ptq_result)`: the metrics written to `results.json`, and the
    `PTQResult` they were measured on.

  Raises:
    ValueError: a bad config, missing data, a policy that does not fit the
      model, an unreadable `init_from`, or calibration data that is too small
      or not finite.
  """
  if config.mode != "ptq":
    raise ValueError(f"mode is {config.mode!r}; ptq_and_evaluate runs mode 'ptq'")
  if config.calibration_size < 1:
    raise ValueError(f"calibration_size={config.calibration_size}; allowed: >= 1")
  workdir = os.path.abspath(workdir)
  splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                         manual_dir=config.manual_dir, val_size=config.val_size,
                         split_seed=config.split_seed)
  model = trainer.build_model(config.replace(mode="train"), splits.spec.num_classes)
  table = layer_table(model, (1, *splits.spec.image_shape))
  policy = trainer.resolve_policy(config, table)
  variables = ckpt_lib.restore_variables(config.init_from)
  variables = jax.tree.map(jnp.asarray, variables)
  batches = calibration_batches(splits, config)

  t0 = time.perf_counter()
  result = pipeline.ptq(jax.random.key(config.seed), model, variables, batches, policy,
                        options_from_config(config))
  ptq_seconds = time.perf_counter() - t0
  evaluate = trainer.Evaluator(result.model, None, config.eval_batch_size)
  val = evaluate(result.variables, splits.val, policy) if len(splits.val) else {}
  test = evaluate(result.variables, splits.test, policy)

  os.makedirs(workdir, exist_ok=True)
  config.save(os.path.join(workdir, "config.json"))
  save_policy(os.path.join(workdir, "policy.json"), policy, model=config.model)
  report = {**result.report, "calibration_images": sum(len(b["image"]) for b in batches),
            "wall_seconds": round(ptq_seconds, 3)}
  haq_io.write_json(os.path.join(workdir, "ptq.json"), report)
  results = {
      "mode": "ptq", "model": config.model, "dataset": config.dataset,
      "policy": policy.to_dict()["layers"],
      "test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
      "val_top1": val.get("top1"), "val_loss": val.get("loss"),
      "ptq_seconds": round(ptq_seconds, 3), "steps": 0,
      "calibration_images": report["calibration_images"],
  }
  haq_io.write_json(os.path.join(workdir, "results.json"), results)
  return results, result
