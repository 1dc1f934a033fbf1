"""Shared test set-up: the persistent compilation cache, a CPU-only JAX, XLA's effort.

The suite's models and batches are tiny, so most modules' time goes into
compiling: XLA compiles them with most optimisations off
(`jax_disable_most_optimizations`: the same programs without LLVM's
optimisation passes; 116 -> 74 CPU-s on the Gumbel soft-policy and folded-BN
tests). A module whose time goes into running what it compiled (the integer
engine's convolutions run many times slower unoptimised) is marked
`pytestmark = pytest.mark.xla_optimized` and compiled with XLA's full
optimisation; so is a test or a parameter marked so. Subprocesses and
notebook kernels inherit the setting through JAX_DISABLE_MOST_OPTIMIZATIONS.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# Every program is kept in the persistent cache, the quick compiles included
# (unoptimised, most take under 0.5 s): the launcher tests' processes and the
# xdist workers read back what another compiled (a digits search's second
# process: 20.7 -> 15.4 s). Launched jobs read it (experiments/cli.py).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from haq_table_testing import HAQ_TABLE  # noqa: E402

_CACHE = os.environ.get("HAQJAX_TEST_JIT_CACHE",
                        os.path.expanduser("~/.cache/haqjax/jit-tests"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
_UNOPTIMIZED = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in (
    "1", "true", "t", "yes", "y", "on")


def _set_effort(unoptimized: bool) -> None:
  jax.config.update("jax_disable_most_optimizations", unoptimized)
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = str(unoptimized).lower()


@pytest.fixture(scope="module", autouse=True)
def xla_effort_module(request):
  """XLA's effort for a module (and its fixtures): full where it is marked."""
  unoptimized = _UNOPTIMIZED and request.node.get_closest_marker("xla_optimized") is None
  _set_effort(unoptimized)
  return unoptimized


@pytest.fixture(autouse=True)
def xla_effort(request, xla_effort_module):
  """XLA's effort for a test: full where it (or a parameter of it) is marked."""
  unoptimized = _UNOPTIMIZED and request.node.get_closest_marker("xla_optimized") is None
  _set_effort(unoptimized)
  yield unoptimized
  _set_effort(xla_effort_module)


@pytest.fixture(scope="module")
def haq_table():
  """HAQ's MobileNetV2 latency table; skips when it is not beside the checkout."""
  if not os.path.exists(HAQ_TABLE):
    pytest.skip("HAQ's table is not in ../shared/data/haq")
  return np.load(HAQ_TABLE)


@pytest.fixture(scope="module")
def mbv2_cloud():
  """MobileNetV2 as HAQ's table has it: ImageNet-100 head, batch 16."""
  from haqjax import hardware  # pylint: disable=g-import-not-at-top
  return hardware.from_model("mobilenet_v2", num_classes=100, batch=16)
