"""Tests of the benchmarks' timing statistic."""

import time

import jax.numpy as jnp
import pytest

from experiments.bench import timing


def test_first_call_is_timed_apart_from_the_repeats():
  delays = iter([0.05] + [0.0] * 3)
  calls = []

  def fn():
    calls.append(1)
    time.sleep(next(delays))
    return jnp.ones(3)

  t = timing.time_call(fn, repeats=3)
  assert len(calls) == 4 and t.repeats == 3
  assert t.first_seconds >= 0.05
  assert t.max < 0.05  # The slow first call is not among the repeats.
  assert t.min <= t.median <= t.max


def test_summarize_reports_median_min_and_max():
  t = timing.summarize([0.3, 0.1, 0.2, 0.9], first_seconds=2.0)
  assert (t.median, t.min, t.max, t.repeats) == (pytest.approx(0.25), 0.1, 0.9, 4)
  assert t.to_dict("ms", 1) == {"median_ms": 250.0, "min_ms": 100.0, "max_ms": 900.0,
                                "repeats": 4, "first_call_seconds": 2.0}
  assert timing.summarize([1.0, 2.0, 4.0]).to_dict("s") == {
      "median_s": 2.0, "min_s": 1.0, "max_s": 4.0, "repeats": 3}


@pytest.mark.parametrize("call, message", [
    (lambda: timing.time_call(lambda: None, repeats=2), "repeats=2; allowed: >= 3"),
    (lambda: timing.summarize([1.0, 2.0]), "2 timed calls; allowed: >= 3"),
    (lambda: timing.summarize([1.0] * 3).to_dict("us"), "unit='us'; allowed: ms, s"),
])
def test_too_few_repeats_or_a_bad_unit_is_refused(call, message):
  with pytest.raises(ValueError, match=message):
    call()
