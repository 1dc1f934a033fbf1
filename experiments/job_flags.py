"""The flags of a haqjax job, shared by the launchers that run one.

`experiments.imagenet` (every mode) and `experiments.sweep` (K vmapped
Gumbel searches) read the same configs from the same flags: one flag per
field of `Config`, `SearchConfig`, `GumbelConfig` and `HawqConfig`, plus
`--workdir`, `--multihost`, `--compilation_cache`, `--export` and `--seeds`.
"""

from __future__ import annotations

from absl import flags

from experiments import cli
from haqjax.search.config import SearchConfig
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.search.hawq.config import HawqConfig
from haqjax.train.config import Config

# The modes whose fine-tunes run over `--seeds`.
SEEDED_MODES = ("qat", "rl", "gumbel", "hawq")

CONFIG_FLAGS = cli.define_flags_from(Config)
SEARCH_FLAGS = cli.define_flags_from(SearchConfig)
GUMBEL_FLAGS = cli.define_flags_from(GumbelConfig)
HAWQ_FLAGS = cli.define_flags_from(HawqConfig)
WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes everything; "
                              "rerun with the same workdir to resume (one run at a time: a "
                              "second one on this machine stops, naming the first).")
MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() "
                              "first (multi-host TPU/GPU jobs).")
EXPORT = flags.DEFINE_bool("export", True, "Modes qat, ptq, rl, gumbel and hawq: end by "
                           "writing the quantized model as an integer model to "
                           "WORKDIR/export/ (model.onnx, model.stablehlo, encodings.json, "
                           "weights.bin), and report its test top-1 as test_top1 with the "
                           "fake-quant one beside it; --noexport reports the fake-quant one.")
SEEDS = flags.DEFINE_integer(
    "seeds", 1, "Modes qat, rl, gumbel and hawq: fine-tune (the searches: their "
    "found policy and their uniform reference) with seeds --seed, --seed+1, ..., "
    "--seed+K-1 as one vmapped job. results.json gains test_top1_mean, "
    "test_top1_std (sample, ddof=1) and test_top1_members (val_top1_* too); "
    "test_top1 and val_top1 are the means, so readers of one run keep working. "
    "A member that diverges is dropped and listed (diverged); the rest are "
    "reported. --export exports member 0, or the first that did not diverge "
    "(export_member in results.json). 1: one run.")
CACHE = flags.DEFINE_string("compilation_cache", "~/.cache/haqjax/jit",
                            "JAX persistent compilation cache folder ('' disables).")


def config_from_flags() -> Config:
  """The training config the flags give."""
  values = cli.values_of(CONFIG_FLAGS)
  if values["val_size"] >= 1:
    if values["val_size"] != int(values["val_size"]):
      raise ValueError(f"val_size={values['val_size']} must be a whole count or a "
                       "fraction in [0, 1)")
    values["val_size"] = int(values["val_size"])
  return Config(**values)


def search_from_flags() -> SearchConfig:
  """The search config the flags give."""
  return cli.config_from_flags(SearchConfig, SEARCH_FLAGS)


def gumbel_from_flags() -> GumbelConfig:
  """The differentiable search's config the flags give."""
  return cli.config_from_flags(GumbelConfig, GUMBEL_FLAGS)


def hawq_from_flags() -> HawqConfig:
  """The Hessian-aware allocation's config the flags give."""
  return cli.config_from_flags(HawqConfig, HAWQ_FLAGS)


def seeds(mode: str) -> int:
  """`--seeds` (K), checked against the mode; a one-line `ValueError` otherwise."""
  count = SEEDS.value
  if count < 1:
    raise ValueError(f"--seeds is {count}; allowed: a positive integer")
  if count > 1 and mode not in SEEDED_MODES:
    raise ValueError(f"--seeds is {count} with --mode={mode}; allowed: 1 "
                     f"(several seeds apply to modes {', '.join(SEEDED_MODES)})")
  return count


def refuse_seeds(launcher: str, instead: str) -> None:
  """A one-line `ValueError` when `--seeds` is set for a launcher that has no use for it."""
  if SEEDS.value != 1:
    raise ValueError(f"--seeds is {SEEDS.value}; {launcher} allows 1 ({instead})")


def workdir() -> str:
  """`--workdir`, which every job needs."""
  if not WORKDIR.value:
    raise ValueError("--workdir is required: the folder the run writes to")
  return WORKDIR.value


def command_line(module: str, argv: list[str]) -> str:
  """The command that reproduces this run, for reports."""
  import shlex  # pylint: disable=g-import-not-at-top
  return " ".join([f"python -m {module}", *(shlex.quote(a) for a in argv[1:])])
