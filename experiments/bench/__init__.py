"""Benchmarks: programs that print and write JSON, not timed tests.

`python -m experiments.bench NAME` runs one (see `__main__.py`); each lives in
its own module with a `run(...) -> dict`: `train`, `quant`, `quant_codebook`,
`hardware`, `ptq`, `search_rl`, `search_gumbel`. Every time they report is
`timing.time_call`'s: the first call (compilation) apart, then the median,
min and max of at least 3 calls.
"""
