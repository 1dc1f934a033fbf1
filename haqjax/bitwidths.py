"""Bit-width conventions shared by policies, cost models and reports.

This module imports nothing, so that code which must not pull in JAX (the
report's plots and run summaries) reads the same constants as the policy and
the cost model.

A bit-width of `FLOAT_BITS` means "leave this tensor in floating point", which
is how HAQ writes its unquantized network input; quantizers pass such a tensor
through and accelerator models run it at their widest integer mode.
"""

FLOAT_BITS = 32
