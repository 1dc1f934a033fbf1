"""Tests of the benchmark dispatcher: every name reaches a module with `run`."""

import importlib
import inspect

from absl import flags
import pytest

from experiments.bench import __main__ as bench_main


@pytest.mark.parametrize("name", bench_main.BENCHMARKS)
def test_every_benchmark_has_a_module_whose_run_takes_its_flags(name):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["bench"])  # Defaults.
  module = importlib.import_module(f"experiments.bench.{bench_main.MODULES[name]}")
  params = inspect.signature(module.run).parameters
  passed = set(bench_main.kwargs_for(name))
  assert passed <= set(params), passed - set(params)
  required = {p for p, v in params.items() if v.default is inspect.Parameter.empty}
  assert required <= passed, required - passed


def test_searches_bench_runs_hawq_with_the_jobs_default_curvature():
  from experiments.bench import searches  # pylint: disable=g-import-not-at-top
  from haqjax.search.hawq.config import HawqConfig  # pylint: disable=g-import-not-at-top
  assert searches.HAWQ_CURVATURE == HawqConfig().hawq_curvature
  assert flags.FLAGS["hawq_curvature"].default == HawqConfig().hawq_curvature
