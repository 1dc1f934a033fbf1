r"""What each budget wall order does to random policies, per budget.

  python -m experiments.wall_orders [--recipe=quickstart] \
      [--targets=bitfusion,cim] [--metrics=latency,energy] [--budgets=w4a4] \
      [--policies=1000] [--seed=0] [--out=wall_orders.json]

For the comparison's budgets (`experiments.compare`: a target, a metric and a
uniform policy whose cost is the limit), draws `--policies` random policies
the way an RL warm-up episode does (every action uniform in [0, 1], HAQ's
mapping to `min_bits..max_bits`, the fixed layers applied) and brings each
within the budget with every order of `haqjax.search.env.WALL_ORDERS`. Per
budget and order it prints the median (and mean) of the bits the wall
removes, the 2-bit activations and weights it leaves, and the spent share
of the budget, as a markdown table; `--out` writes them as JSON. Nothing is
trained: it reads the model's layer table and the cost models only.
"""

from __future__ import annotations

import copy
import itertools
import statistics
from typing import Any

from absl import flags

from experiments import cli
from experiments import families


def _stats(values: list[float]) -> dict[str, float]:
  return {"median": float(statistics.median(values)), "mean": float(statistics.fmean(values))}


def measure(wall, rng, policies: int, orders) -> dict[str, dict[str, Any]]:
  """`{order: {removed, a2, w2, budget_ratio}: {median, mean}}` over random policies."""
  from haqjax.search import env  # pylint: disable=g-import-not-at-top
  n = len(wall.fixed.w)
  free_w, free_a = wall.fixed.w < 0, wall.fixed.a < 0
  rows: dict[str, dict[str, list[float]]] = {
      o: {"removed": [], "a2": [], "w2": [], "budget_ratio": []} for o in orders}
  walls = {}
  for o in orders:  # The same cost tensor and limit, another order.
    env.check_wall_order(o)
    walls[o] = copy.copy(wall)
    walls[o].order = o
  for _ in range(policies):
    w0, a0 = wall.fixed.apply(
        env.action_to_bits(rng.uniform(size=n), wall.min_bits, wall.max_bits),
        env.action_to_bits(rng.uniform(size=n), wall.min_bits, wall.max_bits))
    for order, ordered in walls.items():
      w, a = ordered.enforce(w0, a0)
      rows[order]["removed"].append(int((w0 - w)[free_w].sum() + (a0 - a)[free_a].sum()))
      rows[order]["a2"].append(int((a[free_a] == 2).sum()))
      rows[order]["w2"].append(int((w[free_w] == 2).sum()))
      rows[order]["budget_ratio"].append(ordered.cost(w, a) / ordered.limit)
  return {o: {k: _stats(v) for k, v in r.items()} for o, r in rows.items()}


def run(recipe: str, targets, metrics, budgets, policies: int, seed: int,
        out: str | None = None) -> list[dict[str, Any]]:
  """Every budget's `measure`, printed as a table (and written to `out`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  from haqjax.data.specs import get_spec  # pylint: disable=g-import-not-at-top
  from haqjax.jobs import stages  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.search import env  # pylint: disable=g-import-not-at-top
  from haqjax.train import trainer  # pylint: disable=g-import-not-at-top
  table = None
  results = []
  cells = list(itertools.product(targets, metrics, budgets))
  walls = []
  for target, metric, budget in cells:  # Every budget checked before any is measured.
    config, search, _, _ = families.configs("minmax", budget, families.FULL, None, None,
                                            recipe=recipe, target=target, metric=metric)
    if table is None:
      spec = get_spec(config.dataset)
      table = layer_table(trainer.build_model(config.replace(mode="train"),
                                              spec.num_classes), (1, *spec.image_shape))
    try:
      walls.append(stages.build_wall(config, search, table))
    except ValueError as e:
      raise ValueError(f"--targets={target} --metrics={metric} --budgets={budget}: "
                       f"{e}") from None
  for (target, metric, budget), wall in zip(cells, walls):
    rng = np.random.default_rng(seed)
    results.append({"target": target, "metric": metric, "budget": budget,
                    "layers": len(table), "policies": policies,
                    "orders": measure(wall, rng, policies, env.WALL_ORDERS)})
  print(render(recipe, results))
  if out:
    haq_io.write_json(out, {"recipe": recipe, "seed": seed, "results": results})
  return results


def render(recipe: str, results: list[dict[str, Any]]) -> str:
  lines = [f"# {recipe}: random policies through each budget wall order "
           "(median, mean in brackets)", "",
           "| target | metric | budget | order | bits removed | 2-bit activations "
           "| 2-bit weights | cost / budget |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    for order, s in r["orders"].items():
      cells = [f"{s[k]['median']:.0f} ({s[k]['mean']:.1f})" for k in ("removed", "a2", "w2")]
      lines.append(f"| {r['target']} | {r['metric']} | {r['budget']} | {order} | "
                   f"{' | '.join(cells)} | {s['budget_ratio']['median']:.4f} |")
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("recipe", "quickstart", "The training recipe whose model is measured.")
  flags.DEFINE_list("targets", ["bitfusion"], "Hardware targets.")
  flags.DEFINE_list("metrics", ["latency"], "Budget metrics.")
  flags.DEFINE_list("budgets", ["w4a4"], "Budgets as uniform policies (wXaY).")
  flags.DEFINE_integer("policies", 1000, "Random policies per budget.")
  flags.DEFINE_integer("seed", 0, "Seed of the random policies.")
  flags.DEFINE_string("out", None, "JSON output (default: none).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; flags are --name=value")
  f = flags.FLAGS
  from experiments import compare  # pylint: disable=g-import-not-at-top
  grid = compare.check_grid(f.recipe, f.targets, f.metrics, f.budgets, ["uniform"],
                            "minmax", 1)
  if f.policies < 1:
    raise ValueError(f"--policies={f.policies}; allowed: >= 1")
  cli.quiet_libraries()
  run(grid.recipe, grid.targets, grid.metrics, grid.budgets, f.policies, f.seed, f.out)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
