r"""PTQ of a trained model: an ablation of every step and a few policies.

  python -m experiments.ptq_sweep --init_from=/tmp/haqjax/quickstart \
      --recipe=quickstart --out=/tmp/haqjax/ptq_sweep_quickstart.json

Restores the FP32 model of `--init_from` (trained with `--recipe`), takes
`--calibration_size` training images, and runs the PTQ flow once per row:

* the ablation at W4A8: nearest rounding with min-max ranges, then adding MSE
  ranges, CLE (+ high-bias absorption), bias correction, and AdaRound;
* the full flow (and nearest/min-max) at W8A8, W4A4 and a mixed policy (8-bit
  first and last layers, 4-bit weights and 6-bit activations elsewhere, 3-bit
  weights on the widest half of the middle layers);
* for ReLU6 models, CLE with ReLU6 treated as ReLU (`relu6=relu`).

Prints a markdown table of test top-1 and writes JSON.
"""

from __future__ import annotations

import sys
import time

from absl import flags

from experiments import cli

_INIT_FROM = flags.DEFINE_string("init_from", None, "Workdir of the FP32 run.")
_RECIPE = flags.DEFINE_string("recipe", "quickstart", "Recipe the FP32 run used.")
_OUT = flags.DEFINE_string("out", "ptq_sweep.json", "JSON output path.")
_CALIBRATION = flags.DEFINE_integer("calibration_size", 1024, "Calibration images.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared datasets folder.")
_ONLY = flags.DEFINE_list("only", [], "Run only these rows.")

_NEAREST = dict(cle=False, high_bias_absorption=False, adaround=False,
                bias_correction="none", weight_range="minmax", act_range="minmax")
_FULL = dict(adaround=True)
ROWS = {
    # name: (policy, options)
    "w4a8_nearest_minmax": ("w4a8", _NEAREST),
    "w4a8_+mse": ("w4a8", dict(_NEAREST, weight_range="mse", act_range="mse")),
    "w4a8_+mse+cle": ("w4a8", dict(_NEAREST, weight_range="mse", act_range="mse",
                                   cle=True, high_bias_absorption=True)),
    "w4a8_+mse+cle+bc": ("w4a8", dict(_NEAREST, weight_range="mse", act_range="mse",
                                      cle=True, high_bias_absorption=True,
                                      bias_correction="empirical")),
    "w4a8_+mse+cle+adaround": ("w4a8", _FULL),
    "w4a8_nearest_mse+bc": ("w4a8", dict(_NEAREST, weight_range="mse", act_range="mse",
                                         bias_correction="empirical")),
    "w4a8_adaround_no_cle": ("w4a8", dict(cle=False, high_bias_absorption=False)),
    "w4a8_adaround_not_sequential": ("w4a8", dict(adaround_sequential=False)),
    "w8a8_nearest_minmax": ("w8a8", _NEAREST),
    "w8a8_full": ("w8a8", _FULL),
    "w4a4_nearest_minmax": ("w4a4", _NEAREST),
    "w4a4_full": ("w4a4", _FULL),
    "w3a8_nearest_mse": ("w3a8", dict(_NEAREST, weight_range="mse", act_range="mse")),
    "w3a8_full": ("w3a8", _FULL),
    "mixed_nearest_mse": ("mixed", dict(_NEAREST, weight_range="mse", act_range="mse")),
    "mixed_full": ("mixed", _FULL),
    "w8a8_cle_relu6_as_relu": ("w8a8", dict(_NEAREST, cle=True, relu6="relu")),
    "w8a8_cle_skip_relu6": ("w8a8", dict(_NEAREST, cle=True)),
    "w6a8_nearest_minmax": ("w6a8", _NEAREST),
    "w6a8_cle_relu6_as_relu": ("w6a8", dict(_NEAREST, cle=True, relu6="relu")),
    "w6a8_cle_relu6_as_relu+bc": ("w6a8", dict(_NEAREST, cle=True, relu6="relu",
                                                bias_correction="empirical")),
    "w4a8_+mse+cle_relu6_as_relu": ("w4a8", dict(_NEAREST, weight_range="mse",
                                                 act_range="mse", cle=True,
                                                 high_bias_absorption=True, relu6="relu")),
}


def _mixed_policy(table):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  n = len(table.names)
  w = np.full(n, 4)
  a = np.full(n, 6)
  middle = np.arange(1, n - 1)
  wide = middle[np.argsort(-np.asarray(table.params)[middle])][: len(middle) // 2]
  w[wide] = 3
  w[0], a[0], w[-1], a[-1] = 8, 8, 8, 8
  return Policy.create(table.names, w, a)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {' '.join(argv[1:])!r}; allowed: flags only")
  if not _INIT_FROM.value:
    raise ValueError("--init_from is required: the FP32 run's workdir")
  unknown = sorted(set(_ONLY.value) - set(ROWS))
  if unknown:
    raise ValueError(f"--only has {unknown[0]!r}; allowed: {', '.join(ROWS)}")
  cli.enable_compilation_cache("")
  cli.quiet_libraries()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  from haqjax.ptq import pipeline  # pylint: disable=g-import-not-at-top
  from haqjax.ptq import runner  # pylint: disable=g-import-not-at-top
  from haqjax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top

  config = recipes.load_recipe(_RECIPE.value, data_dir=_DATA_DIR.value, mode="ptq",
                               policy="w8a8", init_from=_INIT_FROM.value,
                               calibration_size=_CALIBRATION.value)
  splits = haq_data.load(config.dataset, data_dir=config.data_dir, val_size=config.val_size,
                         split_seed=config.split_seed)
  model = trainer.build_model(config.replace(mode="train"), splits.spec.num_classes)
  table = layer_table(model, (1, *splits.spec.image_shape))
  variables = jax.tree.map(jnp.asarray, ckpt_lib.restore_variables(_INIT_FROM.value))
  batches = runner.calibration_batches(splits, config)
  evaluate = trainer.Evaluator(model, None, config.eval_batch_size)
  fp32 = evaluate(variables, splits.test, None)["top1"]
  print(f"fp32: test top-1 {fp32:.2f}%", flush=True)
  rows = {"fp32": {"test_top1": fp32}}
  if getattr(model, "clip_relu", False):  # What ReLU6 -> ReLU alone costs.
    relu = trainer.Evaluator(model.clone(clip_relu=False), None, config.eval_batch_size)
    rows["fp32_relu6_as_relu"] = {"test_top1": relu(variables, splits.test, None)["top1"]}
    print(f"fp32 with ReLU for ReLU6: {rows['fp32_relu6_as_relu']['test_top1']:.2f}%",
          flush=True)
  for name, (policy_name, options) in ROWS.items():
    if _ONLY.value and name not in _ONLY.value:
      continue
    if policy_name == "mixed":
      policy = _mixed_policy(table)
    else:
      w, a = int(policy_name[1]), int(policy_name[3])
      policy = Policy.uniform(table.names, w, a)
    opts = pipeline.PTQOptions(**options)
    t0 = time.perf_counter()
    result = pipeline.ptq(jax.random.key(0), model, variables, batches, policy, opts)
    seconds = time.perf_counter() - t0
    quantized = trainer.Evaluator(result.model, None, config.eval_batch_size)
    top1 = quantized(result.variables, splits.test, policy)["top1"]
    rows[name] = {"policy": policy.to_dict()["layers"] if policy_name == "mixed"
                  else policy_name, "options": result.report["options"],
                  "test_top1": top1, "delta_vs_fp32": top1 - fp32,
                  "ptq_seconds": round(seconds, 1), "step_seconds": result.report["seconds"]}
    print(f"{name}: test top-1 {top1:.2f}% ({top1 - fp32:+.2f} pt) in {seconds:.0f} s",
          flush=True)
  haq_io.write_json(_OUT.value, {"experiment": "ptq_sweep", "recipe": _RECIPE.value,
                                 "init_from": _INIT_FROM.value, "model": config.model,
                                 "calibration_images": _CALIBRATION.value, "rows": rows})
  print("\n| row | test top-1 | vs FP32 | PTQ seconds |\n|---|---|---|---|")
  for name, r in rows.items():
    if not name.startswith("fp32"):
      print(f"| {name} | {r['test_top1']:.2f} | {r['delta_vs_fp32']:+.2f} | "
            f"{r['ptq_seconds']:.0f} |")
  print(f"wrote {_OUT.value}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
