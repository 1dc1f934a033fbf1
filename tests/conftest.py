"""Shared test set-up: the persistent compilation cache, a CPU-only JAX.

The suite's models and batches are tiny, so its time goes into compiling:
XLA's backend optimisations are turned off (the same programs, compiled
without LLVM's optimisation passes; 116 -> 74 CPU-s on the Gumbel soft-policy
and folded-BN tests). Subprocesses and notebook kernels inherit the setting.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from haq_table_testing import HAQ_TABLE  # noqa: E402

_CACHE = os.environ.get("HAQJAX_TEST_JIT_CACHE",
                        os.path.expanduser("~/.cache/haqjax/jit-tests"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
