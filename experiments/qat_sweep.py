r"""QAT of the quickstart model under several quantizers and uniform policies.

  python -m experiments.qat_sweep --workdir=/tmp/haqjax/qat_sweep [--epochs=2]

Trains (or reuses) the FP32 quickstart model in `<workdir>/fp32`, then
fine-tunes it from there with each (quantizer, policy) pair of the sweep:
min-max STE weights with static (calibrated, fixed) activation ranges, LSQ
(the paper's initial step, and `lsq_mse`'s least-squared-error one) and
PACT at W8A8 (min-max only), W4A4, W3A3 and W2A2, and k-means weight-only
at 2/3/4 bits (activations in floating point, kernels without weight
decay). Every run
has its own workdir (a rerun resumes or skips finished runs). Writes
`<workdir>/qat_sweep.json` and prints a markdown table of test top-1.

Each run then ends as a `--mode=qat` job does (`--export`, on by default):
its integer model is built and written to `<run>/export/`
(`haqjax.jobs.export.finish_run`), and the row's `test_top1` is the integer
model's, with the fake-quant and onnxruntime figures beside it and
`integer_agreement`, the share of test images whose integer prediction is
the fake-quantized model's (`haqjax.api.training.integer_scores`). A run the
engine cannot lower (k-means codebooks) keeps its fake-quant figure and
says why in `integer_error`. A rerun exports again (finished trainings are
not repeated).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import flags

from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/haqjax/qat_sweep", "Where runs are written.")
_EPOCHS = flags.DEFINE_float("epochs", None, "QAT epochs (default: the QAT recipe's).")
_ONLY = flags.DEFINE_list("only", [], "Run only these rows (e.g. lsq_w4a4,kmeans_w2).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared datasets folder.")
_EXPORT = flags.DEFINE_bool("export", True, "Export each run's integer model and report "
                            "its test top-1 (see the module docstring).")

# name -> (weight quantizer, activation quantizer, policy)
SWEEP = {
    "minmax_w8a8": ("minmax", "static", "w8a8"),
    **{f"{kind}_w{b}a{b}": (w, a, f"w{b}a{b}")
       for b in (4, 3, 2)
       for kind, (w, a) in {"ste": ("minmax", "static"), "lsq": ("lsq", "lsq"),
                            "lsq_mse": ("lsq_mse", "lsq_mse"),
                            "pact": ("minmax", "pact")}.items()},
    **{f"kmeans_w{b}": ("kmeans", "static", f"w{b}a32") for b in (2, 3, 4)},
}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {' '.join(argv[1:])!r}; allowed: flags only")
  unknown = sorted(set(_ONLY.value) - set(SWEEP))
  if unknown:
    raise ValueError(f"--only has {unknown[0]!r}; allowed: {', '.join(SWEEP)}")
  cli.enable_compilation_cache("")
  cli.quiet_libraries()
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top

  root = os.path.abspath(_WORKDIR.value)
  haq_io.claim(root)  # A second run with this --workdir stops here.
  common = {"progress": False, "tensorboard": False, "data_dir": _DATA_DIR.value}
  fp32_dir = os.path.join(root, "fp32")
  t0 = time.perf_counter()
  fp32 = trainer.train_and_evaluate(recipes.load_recipe("quickstart", **common), fp32_dir)
  print(f"fp32: test top-1 {fp32['test_top1']:.2f}%", flush=True)
  rows = {"fp32": {"test_top1": fp32["test_top1"], "val_top1": fp32["val_top1"]}}
  qat = dict(common, init_from=fp32_dir)
  if _EPOCHS.value:
    qat["epochs"] = _EPOCHS.value
  for name, (wq, aq, policy) in SWEEP.items():
    if _ONLY.value and name not in _ONLY.value:
      continue
    # K-means trains the codebook only (the assignment is frozen, Deep
    # Compression), so the kernels get no weight decay either.
    extra = {"weight_decay": 0.0} if wq == "kmeans" else {}
    config = recipes.load_recipe("quickstart_qat", policy=policy, weight_quantizer=wq,
                                 act_quantizer=aq, **qat, **extra)
    t = time.perf_counter()
    run_dir = os.path.join(root, name)
    run = trainer.train_and_evaluate(config, run_dir)
    figures = integer_figures(config, run_dir, run) if _EXPORT.value else {}
    top1 = figures.get("test_top1", run["test_top1"])
    rows[name] = {"weight_quantizer": wq, "act_quantizer": aq, "policy": policy,
                  "epochs": config.epochs, "test_top1": top1,
                  "test_top1_fake_quant": run["test_top1"], **figures,
                  "val_top1": run["val_top1"], "delta_vs_fp32": top1 - fp32["test_top1"],
                  "wall_seconds": round(time.perf_counter() - t, 1)}
    source = figures.get("test_top1_source", "fake_quant").replace("_", "-")
    print(f"{name}: test top-1 {top1:.2f}% ({source}; {top1 - fp32['test_top1']:+.2f} pt "
          f"vs FP32)", flush=True)
  out_path = os.path.join(root, "qat_sweep.json")
  if os.path.exists(out_path):  # Keep rows of earlier invocations (--only).
    with open(out_path) as f:
      rows = {**json.load(f).get("rows", {}), **rows}
  result = {"experiment": "qat_sweep", "model": "quickstart_cnn",
            "dataset": "fashion_mnist", "rows": rows,
            "wall_seconds": round(time.perf_counter() - t0, 1)}
  haq_io.write_json(os.path.join(root, "qat_sweep.json"), result)
  print("\n| run | weights | activations | policy | test top-1 | fake-quant | onnxruntime "
        "| same predictions | vs FP32 |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, r in rows.items():
    if name == "fp32":
      print(f"| fp32 | - | - | float | {r['test_top1']:.2f} | | | | - |")
    else:
      print(f"| {name} | {r['weight_quantizer']} | {r['act_quantizer']} | {r['policy']} "
            f"| {r['test_top1']:.2f} | {_percent(r.get('test_top1_fake_quant'))} "
            f"| {_percent(r.get('test_top1_onnxruntime'))} "
            f"| {_percent(r.get('integer_agreement'))} | {r['delta_vs_fp32']:+.2f} |")
  print(f"wrote {os.path.join(root, 'qat_sweep.json')}", file=sys.stderr)


def _percent(value: float | None) -> str:
  return "" if value is None else f"{value:.2f}"


def integer_figures(config, run_dir: str, run: dict[str, Any]) -> dict[str, Any]:
  """The finished run's integer model: exported, scored, compared with fake-quant.

  Returns:
    `haqjax.jobs.export.final_top1`'s keys (`test_top1` the integer model's
    where it lowers) and `integer_agreement`, the percent of test images
    whose integer prediction equals the fake-quantized model's (None where
    the engine cannot lower the model).
  """
  from haqjax import data as haq_data  # pylint: disable=g-import-not-at-top
  from haqjax.api import training  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import export as export_lib  # pylint: disable=g-import-not-at-top
  from haqjax.policy import load_policy  # pylint: disable=g-import-not-at-top
  from haqjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  done = export_lib.finish_run(config, run_dir, run)
  figures = {k: done[k] for k in ("test_top1", "test_top1_onnxruntime", "test_top1_source",
                                  "integer_error")}
  figures["integer_agreement"] = None
  if done["test_top1_source"] == "integer":
    splits = haq_data.load(config.dataset, data_dir=config.data_dir,
                           manual_dir=config.manual_dir, val_size=config.val_size,
                           split_seed=config.split_seed)
    _, policy_path = export_lib.read_run(run_dir)
    found = training.integer_scores(
        trainer.build_model(config, splits.spec.num_classes),
        checkpoint.restore_variables(run_dir), load_policy(policy_path), splits.test,
        config.eval_batch_size)
    figures["integer_agreement"] = found.get("agreement")
  return figures


if __name__ == "__main__":
  cli.run(main)
