"""Tests of `python -m experiments.wall_orders` (random policies through each wall order)."""

import json

import pytest

from experiments import wall_orders
from haqjax import hardware
from haqjax.search import env


def test_every_order_fits_and_the_saving_order_removes_fewer_bits(tmp_path, capsys):
  out = tmp_path / "orders.json"
  results = wall_orders.run("digits", ["bitfusion", "cim"], ["latency"], ["w3a3"],
                            policies=40, seed=0, out=str(out))
  assert json.loads(out.read_text())["results"] == results
  assert [(r["target"], r["budget"]) for r in results] == [("bitfusion", "w3a3"),
                                                           ("cim", "w3a3")]
  for r in results:
    orders = r["orders"]
    assert tuple(orders) == env.WALL_ORDERS
    for s in orders.values():
      assert s["budget_ratio"]["median"] <= 1 + hardware.budget.RTOL
      assert 0 <= s["a2"]["mean"] <= r["layers"] and s["removed"]["median"] >= 0
    assert orders["saving"]["removed"]["mean"] < orders["haq"]["removed"]["mean"]
  printed = capsys.readouterr().out
  assert "| cim | latency | w3a3 | saving |" in printed


def test_a_budget_below_every_policy_names_its_flags(tmp_path):
  with pytest.raises(ValueError, match=r"^--targets=cim --metrics=latency --budgets=w1a1: "
                     r"budget .* is below the lowest cost"):
    wall_orders.run("digits", ["cim"], ["latency"], ["w1a1"], policies=1, seed=0,
                    out=str(tmp_path / "none.json"))
  assert not (tmp_path / "none.json").exists()
