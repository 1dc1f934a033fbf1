r"""The haqjax launcher: FP32 training and QAT on any supported dataset.

  python -m experiments.imagenet --flagfile=experiments/flags/quickstart.flags \
      --workdir=/tmp/haqjax/quickstart

Flags given after --flagfile override it. `--dataset` picks the data, so the
same module runs ImageNet, CIFAR-10, Fashion-MNIST and digits. A rerun with
the same --workdir resumes. Modes: `train` (floating point), `qat`
(fine-tuning under --policy=wXaY or a policy JSON, usually --init_from the
FP32 run's workdir), `ptq` (post-training quantization of --init_from under
--policy on --calibration_size training images), `rl` (the HAQ job: FP32
model, DDPG bit search under --target/--budget_*, fine-tune, test, report),
`gumbel` (the same job with the differentiable search, --gumbel_* flags),
`hawq` (Hessian-aware sensitivities and an ILP allocation, --hawq_* flags)
and `export` (the integer model of the finished qat/ptq run --init_from,
scored by the integer engine and onnxruntime and written to WORKDIR/export/:
model.onnx, model.stablehlo, encodings.json, weights.bin, results.json).
The modes that end with a quantized model (qat, ptq, rl, gumbel, hawq) run
that export last, so their test_top1 is the integer model's (the fake-quant
figure beside it, test_top1_fake_quant); --noexport skips it. ONNX needs
the `export` extra; without it the rest is still written. `--seeds=K`
(modes qat, rl, gumbel, hawq) runs the fine-tunes over K seeds as one
vmapped job (`haqjax.train.seeds`): test_top1 is their mean, with
test_top1_std and test_top1_members beside it (a diverged member dropped and
listed), and member 0, or the first that did not diverge, is exported.
"""

from __future__ import annotations

import json
import sys

from experiments import cli
from experiments import job_flags


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; flags are --name=value")
  workdir = job_flags.workdir()
  config = job_flags.config_from_flags()
  seeds = job_flags.seeds(config.mode)
  searching = config.mode in ("rl", "gumbel", "hawq")
  search = job_flags.search_from_flags() if searching else None
  gumbel = job_flags.gumbel_from_flags() if config.mode == "gumbel" else None
  hawq = job_flags.hawq_from_flags() if config.mode == "hawq" else None
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  if job_flags.MULTIHOST.value:
    from haqjax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize_multihost()
    import jax  # pylint: disable=g-import-not-at-top
    haq_io.claim(workdir, part=f"process {jax.process_index()}")
  else:
    haq_io.claim(workdir)  # A second run with this --workdir stops here.
  cli.enable_compilation_cache(job_flags.CACHE.value)
  cli.quiet_libraries()
  command = job_flags.command_line("experiments.imagenet", sys.argv)
  export = job_flags.EXPORT.value
  quantized = None
  if config.mode == "ptq":
    from haqjax.ptq import runner  # pylint: disable=g-import-not-at-top
    results, ptq_result = runner.run(config, workdir)
    quantized = (ptq_result.model, ptq_result.variables)
  elif config.mode == "rl":
    from haqjax.jobs import rl  # pylint: disable=g-import-not-at-top
    results = rl.search_and_evaluate(config, search, workdir, command, export=export,
                                     seeds=seeds)
    results["steps"] = results["episodes"]
  elif config.mode == "gumbel":
    from haqjax.jobs import gumbel as gumbel_job  # pylint: disable=g-import-not-at-top
    results = gumbel_job.search_and_evaluate(config, search, gumbel, workdir, command,
                                             export=export, seeds=seeds)
    results["steps"] = results["search_steps"]
  elif config.mode == "hawq":
    from haqjax.jobs import hawq as hawq_job  # pylint: disable=g-import-not-at-top
    results = hawq_job.search_and_evaluate(config, search, hawq, workdir, command,
                                           export=export, seeds=seeds)
    results["steps"] = results["trace_iterations"]
  elif config.mode == "export":
    from haqjax.jobs import export as export_lib  # pylint: disable=g-import-not-at-top
    results = export_lib.export_run(config, workdir)
  elif seeds > 1:
    from haqjax.train import seeds as seeds_lib  # pylint: disable=g-import-not-at-top
    results = seeds_lib.train_and_evaluate_seeds(
        config, workdir, seeds_lib.seed_list(config.seed, seeds))
  else:
    from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
    results = trainer.train_and_evaluate(config, workdir)
  if config.mode == "qat" and export and seeds > 1:
    from haqjax.jobs import seeds as seeds_job  # pylint: disable=g-import-not-at-top
    results = seeds_job.finish_seeds(config, workdir, results)
  elif config.mode in ("qat", "ptq") and export:
    from haqjax.jobs import export as export_lib  # pylint: disable=g-import-not-at-top
    results = export_lib.finish_run(config, workdir, results, quantized)
  summary = {k: results[k] for k in ("mode", "model", "dataset", "test_top1",
                                     "test_top5", "val_top1", "steps")}
  print(json.dumps(summary), file=sys.stdout, flush=True)


if __name__ == "__main__":
  cli.run(main)
