r"""Launcher of K differentiable bit searches as one vmapped job (`haqjax.jobs.sweep`).

  python -m experiments.sweep --flagfile=experiments/flags/quickstart_sweep.flags \
      --init_from=/tmp/haqjax/quickstart/fp32 --workdir=/tmp/haqjax/quickstart_sweep \
      --sweep.budget=0.5,0.6,0.7,0.8,0.9,1.0,1.2,1.4 [--sweep.lambda=0.1,1] \
      [--sweep_combine=product|zip] [--nosweep_finetune] \
      [--uniform_results=uniform.json | --uniform_policies=w2a2,w3a3,w4a4,w8a8] \
      [--rl_workdir=/tmp/haqjax/quickstart_rl] [--gumbel_workdir=...]

Every flag of `experiments.imagenet` (mode `gumbel`) applies; the flagfile is
the base config and `--sweep.<axis>=v1,v2,...` the swept axes. What the job
runs, its axes, keys and outputs are described in `haqjax.jobs.sweep`, which
notebooks and tests call too. A rerun with the same --workdir resumes.
"""

from __future__ import annotations

import sys

from absl import flags

from experiments import cli
from experiments import job_flags
from haqjax.search.gumbel import sweep as sweep_lib

_AXES = {name: flags.DEFINE_list(f"sweep.{name}", None,
                                 f"Swept values of {field} (comma-separated).")
         for name, field in sweep_lib.AXES.items()}
_COMBINE = flags.DEFINE_string("sweep_combine", "product", "How the axes combine into "
                               "members: 'product' or 'zip'.")
_FINETUNE = flags.DEFINE_bool("sweep_finetune", True, "Fine-tune and test every "
                              "member's policy (else the table has search accuracies).")
_UNIFORM_POLICIES = flags.DEFINE_list(
    "uniform_policies", [], "Uniform policies (wXaY) to fine-tune here with the "
    "members' recipe, for the Pareto plot.")
_RL_WORKDIR = flags.DEFINE_string("rl_workdir", None, "A finished `rl` job whose "
                                  "results.json goes on the Pareto plot.")
_GUMBEL_WORKDIR = flags.DEFINE_string("gumbel_workdir", None, "A finished `gumbel` "
                                      "job whose results.json goes on the Pareto plot.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; flags are --name=value")
  workdir = job_flags.workdir()
  job_flags.refuse_seeds("experiments.sweep", "sweep seeds with --sweep.seed=0,1,2")
  spec = sweep_lib.SweepSpec.parse({n: f.value for n, f in _AXES.items()},
                                   combine=_COMBINE.value)
  config = job_flags.config_from_flags()
  search = job_flags.search_from_flags()
  gumbel = job_flags.gumbel_from_flags()
  cli.enable_compilation_cache(job_flags.CACHE.value)
  cli.quiet_libraries()
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  haq_io.claim(workdir)  # A second run with this --workdir stops here.
  from haqjax.jobs import sweep as sweep_job  # pylint: disable=g-import-not-at-top
  results = sweep_job.sweep_and_evaluate(
      config, search, gumbel, spec, workdir, finetune=_FINETUNE.value,
      uniform_results=search.uniform_results,
      uniform_policies=tuple(_UNIFORM_POLICIES.value), rl_workdir=_RL_WORKDIR.value,
      gumbel_workdir=_GUMBEL_WORKDIR.value,
      command=job_flags.command_line("experiments.sweep", sys.argv))
  print(sweep_job.markdown_table(results), flush=True)


if __name__ == "__main__":
  cli.run(main)
