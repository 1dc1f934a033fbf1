"""Readable cost units (haqjax/units.py): exact strings a person reads."""

import pytest

from haqjax import units


@pytest.mark.parametrize("value, unit, text", [
    # Latency: the quickstart's W4A4 reference on bismo-edge, and neighbours.
    (7.244e-05, "s", "72.4 \u00b5s"),
    (7.3e-05, "s", "73.0 \u00b5s"),
    (1.5e-7, "s", "150 ns"),
    (0.0125, "s", "12.5 ms"),
    (2.5, "s", "2.50 s"),
    (1234.6, "s", "1235 s"),  # No prefix above the base unit for seconds.
    (9.9996e-4, "s", "1.00 ms"),  # Rounds up to the next prefix.
    (0.0, "s", "0 s"),
    # Energy.
    (3.2e-6, "J", "3.20 \u00b5J"),
    (0.04567, "J", "45.7 mJ"),
    # Bytes: binary prefixes.
    (512.0, "bytes", "512 B"),
    (2048.0, "bytes", "2.00 KiB"),
    (3.2e6, "bytes", "3.05 MiB"),
    (1023.999 * 1024, "bytes", "1.00 MiB"),
    (5 * 2.0 ** 30, "bytes", "5.00 GiB"),
    # Counts: decimal prefixes.
    (3.4e9, "bit-ops", "3.40 GBitOps"),
    (5.0e5, "bit-ops", "500 kBitOps"),
    (3136.0, "cycles", "3.14 kcycles"),
    (512.0, "cycles", "512 cycles"),
])
def test_format_cost(value, unit, text):
  assert units.format_cost(value, unit) == text


def test_format_cost_of_none_and_other_digits():
  assert units.format_cost(None, "s") == "n/a"
  assert units.format_cost(7.244e-05, "s", digits=4) == "72.44 \u00b5s"


def test_format_costs_shares_the_column_prefix():
  label, cells = units.format_costs([7.1e-05, 1.2e-06, None], "s")
  assert (label, cells) == ("\u00b5s", ["71.0", "1.20", "n/a"])
  label, cells = units.format_costs([2048.0, 512.0], "bytes")
  assert (label, cells) == ("KiB", ["2.00", "0.500"])
  assert units.format_costs([], "bit-ops") == ("BitOps", [])


@pytest.mark.parametrize("value, text", [
    (-2.7e-6, "-2.70 \u00b5s"), (1.2e-3, "+1.20 ms"), (0.0, "+0 s"), (None, "n/a")])
def test_format_delta(value, text):
  assert units.format_delta(value, "s") == text


@pytest.mark.parametrize("x, text", [
    (72.44, "72.4"), (9.996, "10.0"), (0.0123456, "0.0123"), (123456.0, "123456"),
    (-4.5, "-4.50"), (0.0, "0")])
def test_format_number(x, text):
  assert units.format_number(x) == text


def test_unknown_unit_keeps_its_name_with_decimal_prefixes():
  assert units.format_cost(4.2e6, "widgets") == "4.20 Mwidgets"
  assert units.scale("widgets", [4.2]) == (1.0, "widgets")


def test_digits_apart_tells_close_costs_apart():
  # The quickstart's found policy and uniform W4A4: 0.1% apart.
  costs = [7.336e-05, 7.344e-05]
  assert units.digits_apart(costs, "s") == 4
  assert [units.format_cost(c, "s", 4) for c in costs] == ["73.36 \u00b5s", "73.44 \u00b5s"]
  assert units.digits_apart([7.07e-05, 7.35e-05], "s") == 3
  assert units.digits_apart([7.3e-05, 7.3e-05], "s") == 3  # Equal values stay at 3.
  assert units.digits_apart([1.0, 1.0 + 1e-12], "s") == 6  # At most `most`.
