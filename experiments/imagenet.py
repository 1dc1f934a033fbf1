r"""The haqjax launcher: FP32 training and QAT on any supported dataset.

  python -m experiments.imagenet --flagfile=experiments/flags/quickstart.flags \
      --workdir=/tmp/haqjax/quickstart

Flags given after --flagfile override it. `--dataset` picks the data, so the
same module runs ImageNet, CIFAR-10, Fashion-MNIST and digits. A rerun with
the same --workdir resumes. Modes: `train` (floating point), `qat`
(fine-tuning under --policy=wXaY or a policy JSON, usually --init_from the
FP32 run's workdir), `ptq` (post-training quantization of --init_from under
--policy on --calibration_size training images), `rl` (the HAQ job: FP32
model, DDPG bit search under --target/--budget_*, fine-tune, test, report)
and `gumbel` (the same job with the differentiable search, --gumbel_* flags).
"""

from __future__ import annotations

import json
import shlex
import sys

from absl import flags

from experiments import cli
from haqjax.search.config import SearchConfig
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.train.config import Config

_CONFIG_FLAGS = cli.define_flags_from(Config)
_SEARCH_FLAGS = cli.define_flags_from(SearchConfig)
_GUMBEL_FLAGS = cli.define_flags_from(GumbelConfig)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes everything; "
                               "rerun with the same workdir to resume.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() "
                               "first (multi-host TPU/GPU jobs).")
_CACHE = flags.DEFINE_string("compilation_cache", "~/.cache/haqjax/jit",
                             "JAX persistent compilation cache folder ('' disables).")


def config_from_flags() -> Config:
  values = cli.values_of(_CONFIG_FLAGS)
  if values["val_size"] >= 1:
    if values["val_size"] != int(values["val_size"]):
      raise ValueError(f"val_size={values['val_size']} must be a whole count or a "
                       "fraction in [0, 1)")
    values["val_size"] = int(values["val_size"])
  return Config(**values)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; flags are --name=value")
  if not _WORKDIR.value:
    raise ValueError("--workdir is required: the folder the run writes to")
  config = config_from_flags()
  searching = config.mode in ("rl", "gumbel")
  search = SearchConfig(**cli.values_of(_SEARCH_FLAGS)) if searching else None
  gumbel = (GumbelConfig(**cli.values_of(_GUMBEL_FLAGS)) if config.mode == "gumbel"
            else None)
  if _MULTIHOST.value:
    from haqjax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize_multihost()
  cli.enable_compilation_cache(_CACHE.value)
  cli.quiet_libraries()
  if config.mode == "ptq":
    from haqjax.ptq import runner  # pylint: disable=g-import-not-at-top
    results = runner.ptq_and_evaluate(config, _WORKDIR.value)
  elif config.mode == "rl":
    from haqjax.search import runner  # pylint: disable=g-import-not-at-top
    command = " ".join(["python -m experiments.imagenet",
                        *(shlex.quote(a) for a in sys.argv[1:])])
    results = runner.search_and_evaluate(config, search, _WORKDIR.value, command)
    results["steps"] = results["episodes"]
  elif config.mode == "gumbel":
    from haqjax.search.gumbel import runner  # pylint: disable=g-import-not-at-top
    command = " ".join(["python -m experiments.imagenet",
                        *(shlex.quote(a) for a in sys.argv[1:])])
    results = runner.search_and_evaluate(config, search, gumbel, _WORKDIR.value, command)
    results["steps"] = results["search_steps"]
  else:
    from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
    results = trainer.train_and_evaluate(config, _WORKDIR.value)
  summary = {k: results[k] for k in ("mode", "model", "dataset", "test_top1",
                                     "test_top5", "val_top1", "steps")}
  print(json.dumps(summary), file=sys.stdout, flush=True)


if __name__ == "__main__":
  cli.run(main)
