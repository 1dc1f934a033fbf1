"""Shared test set-up: the persistent compilation cache, a CPU-only JAX."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = os.environ.get("HAQJAX_TEST_JIT_CACHE",
                        os.path.expanduser("~/.cache/haqjax/jit-tests"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
