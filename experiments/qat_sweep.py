r"""QAT of the quickstart model under several quantizers and uniform policies.

  python -m experiments.qat_sweep --workdir=/tmp/haqjax/qat_sweep [--epochs=2]

Trains (or reuses) the FP32 quickstart model in `<workdir>/fp32`, then
fine-tunes it from there with each (quantizer, policy) pair of the sweep:
min-max STE weights with static (calibrated, fixed) activation ranges, LSQ
and PACT at W8A8 (min-max only), W4A4, W3A3 and W2A2, and
k-means weight-only at 2/3/4 bits (activations in floating point, kernels without weight decay). Every run
has its own workdir (a rerun resumes or skips finished runs). Writes
`<workdir>/qat_sweep.json` and prints a markdown table of test top-1.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/haqjax/qat_sweep", "Where runs are written.")
_EPOCHS = flags.DEFINE_float("epochs", None, "QAT epochs (default: the QAT recipe's).")
_ONLY = flags.DEFINE_list("only", [], "Run only these rows (e.g. lsq_w4a4,kmeans_w2).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared datasets folder.")

# name -> (weight quantizer, activation quantizer, policy)
SWEEP = {
    "minmax_w8a8": ("minmax", "static", "w8a8"),
    **{f"{kind}_w{b}a{b}": (w, a, f"w{b}a{b}")
       for b in (4, 3, 2)
       for kind, (w, a) in {"ste": ("minmax", "static"), "lsq": ("lsq", "lsq"),
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
    run = trainer.train_and_evaluate(config, os.path.join(root, name))
    rows[name] = {"weight_quantizer": wq, "act_quantizer": aq, "policy": policy,
                  "epochs": config.epochs, "test_top1": run["test_top1"],
                  "val_top1": run["val_top1"],
                  "delta_vs_fp32": run["test_top1"] - fp32["test_top1"],
                  "wall_seconds": round(time.perf_counter() - t, 1)}
    print(f"{name}: test top-1 {run['test_top1']:.2f}% "
          f"({run['test_top1'] - fp32['test_top1']:+.2f} pt vs FP32)", flush=True)
  out_path = os.path.join(root, "qat_sweep.json")
  if os.path.exists(out_path):  # Keep rows of earlier invocations (--only).
    with open(out_path) as f:
      rows = {**json.load(f).get("rows", {}), **rows}
  result = {"experiment": "qat_sweep", "model": "quickstart_cnn",
            "dataset": "fashion_mnist", "rows": rows,
            "wall_seconds": round(time.perf_counter() - t0, 1)}
  haq_io.write_json(os.path.join(root, "qat_sweep.json"), result)
  print("\n| run | weights | activations | policy | test top-1 | vs FP32 |")
  print("|---|---|---|---|---|---|")
  for name, r in rows.items():
    if name == "fp32":
      print(f"| fp32 | - | - | float | {r['test_top1']:.2f} | - |")
    else:
      print(f"| {name} | {r['weight_quantizer']} | {r['act_quantizer']} | {r['policy']} "
            f"| {r['test_top1']:.2f} | {r['delta_vs_fp32']:+.2f} |")
  print(f"wrote {os.path.join(root, 'qat_sweep.json')}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
