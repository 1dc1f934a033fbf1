"""The report of one search run: `report.md` and a self-contained `report.html`.

`write_report(workdir)` reads only what a finished search job left in its
workdir (config.json, search_config.json, gumbel_config.json, layers.json,
policy.json, results.json, plots/*.png), so it can be rerun on any old run::

    from haqjax.report import write_report
    write_report("/tmp/haqjax/quickstart_rl")   # report.md, report.html

Both files carry the same content, built once as a list of blocks and then
rendered twice (`haqjax.report.render`): the command that reproduces the run,
the budget, accuracy and cost at each stage (FP32, search, after fine-tune,
the integer model of `export/`: `haqjax.report.integer_model`), the found
policy beside the uniform policy its budget refers to
(`haqjax.report.versus_uniform`), timings, the plots, the policy with every
layer's cost under the search's hardware model, and the config (the fields
that differ from the defaults, then all of it). Nothing is recomputed:
per-layer costs are the `layer_costs` the search saved. Costs read in the
units of `haqjax.units` (73.4 µs, 1.25 mJ, 12.0 KiB); results.json keeps
the SI values. The HTML page embeds its plots as base64 data URIs and its
CSS inline, so it is one file that opens anywhere, offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from haqjax import configs
from haqjax import io as haq_io
from haqjax import units
from haqjax.bitwidths import FLOAT_BITS
from haqjax.report import integer_model
from haqjax.report import versus_uniform
from haqjax.report.render import html_table  # noqa: F401  (re-exported: notebooks use it)
from haqjax.report.render import markdown_table  # noqa: F401  (re-exported: notebooks use it)
from haqjax.report.render import to_html
from haqjax.report.render import to_markdown

# Files every finished search job writes (results.json last).
RUN_FILES = ("config.json", "search_config.json", "layers.json", "policy.json",
             "results.json")
_HEADINGS = {"rl": "HAQ search", "gumbel": "Gumbel bit search", "hawq": "HAWQ allocation"}
# Plots in the order a reader wants them, with captions; other PNGs follow.
_FIGURES = {"bits.png": "per-layer bits",
            "uniform.png": "test top-1 vs cost: found policy and uniform",
            "search.png": "search progress",
            "w_probs.png": "weight bit probabilities",
            "a_probs.png": "activation bit probabilities"}


# Timed stages (results.json keys) and how the summary names them.
_STAGES = {"fp32_seconds": "FP32", "search_seconds": "search",
           "finetune_seconds": "fine-tune", "export_seconds": "export",
           "uniform_reference_seconds": "uniform reference"}


class Run(NamedTuple):
  """Everything a finished search job saved (plain JSON data)."""
  workdir: str
  config: dict[str, Any]
  search: dict[str, Any]
  gumbel: dict[str, Any] | None
  layers: list[dict[str, Any]]
  policy: dict[str, Any]
  results: dict[str, Any]


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def load_run(workdir: str | os.PathLike) -> Run:
  """Reads a finished search run.

  Raises:
    ValueError: if `workdir` is not a folder holding a finished 'rl' or
      'gumbel' run (one of `RUN_FILES` is missing or unreadable).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  if not os.path.isdir(workdir):
    raise ValueError(f"{workdir} is not a folder; expected the workdir of a finished search")
  missing = [f for f in RUN_FILES if not os.path.exists(os.path.join(workdir, f))]
  if missing:
    raise ValueError(f"{workdir} is not a finished search run: it has no {missing[0]} "
                     "(a search job writes results.json last)")
  try:
    data = {f: _read_json(os.path.join(workdir, f)) for f in RUN_FILES}
    gumbel_path = os.path.join(workdir, "gumbel_config.json")
    gumbel = _read_json(gumbel_path) if os.path.exists(gumbel_path) else None
  except json.JSONDecodeError as e:
    raise ValueError(f"{workdir} holds an unreadable JSON file: {e}") from None
  results = data["results.json"]
  if results.get("mode") not in _HEADINGS:
    raise ValueError(f"{workdir}/results.json has mode={results.get('mode')!r}; "
                     f"allowed: {', '.join(_HEADINGS)} (a search run)")
  return Run(workdir, data["config.json"], data["search_config.json"], gumbel,
             data["layers.json"], data["policy.json"], results)


# ------------------------------------------------------------------ content


def command_of(run: Run) -> tuple[str, bool]:
  """The command that reproduces `run`, and whether it is the one that ran.

  Searches store the command line in results.json; older runs have it in
  report.md. Failing both, it is rebuilt from the saved configs (every field
  that differs from its default, as a flag).
  """
  if run.results.get("command"):
    return run.results["command"], True
  md = os.path.join(run.workdir, "report.md")
  if os.path.exists(md):
    with open(md) as f:
      m = re.search(r"^Reproduce: `(.+)`$", f.read(), flags=re.M)
    if m:
      return m.group(1), True
  flags = [f"--{k}={_flag_value(v)}" for _, k, v, _ in config_changes(run)
           if v is not None and k not in ("mode", "progress")]
  return " ".join(["python -m experiments.imagenet", f"--mode={run.results['mode']}",
                   *flags, f"--workdir={run.workdir}"]), False


def _flag_value(v: Any) -> str:
  if isinstance(v, (tuple, list)):
    return ",".join(map(str, v))
  return str(v).lower() if isinstance(v, bool) else str(v)


def _config_classes():
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.search.gumbel.config import GumbelConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  return (("config", Config), ("search", SearchConfig), ("gumbel", GumbelConfig))


def config_changes(run: Run) -> list[tuple[str, str, Any, Any]]:
  """`(section, field, value, default)` of every saved field off its default."""
  out = []
  for section, cls in _config_classes():
    saved = getattr(run, section)
    if saved is None:
      continue
    # Flag by flag: a nested config's fields are flags of their own.
    defaults = {flag: default for flag, (_, _, default) in configs.flag_fields(cls).items()
                if default is not dataclasses.MISSING}
    for key, value in configs.flatten(cls, saved).items():
      default = defaults.get(key, "(none)")
      if isinstance(value, list):
        value = tuple(value)
      if value != default:
        out.append((section, key, value, default))
  return out


def table_from_rows(rows: Sequence[dict[str, Any]]):
  """The `haqjax.nn.LayerTable` of a run's layers.json rows."""
  from haqjax.nn.table import COLUMNS, LayerTable  # pylint: disable=g-import-not-at-top
  return LayerTable(names=tuple(l["name"] for l in rows), kinds=tuple(l["kind"] for l in rows),
                    **{c: np.asarray([l[c] for l in rows], np.int64) for c in COLUMNS})


def layer_costs(run: Run) -> np.ndarray | None:
  """Each layer's cost `[L]` under the run's budget metric, as the search saved it.

  Search jobs write `layer_costs` into results.json: one float per layer in
  layer-table order, in the budget metric's unit, summing to `cost`. A run
  from before they were saved has none: `None`.

  Raises:
    ValueError: if `layer_costs` is not one finite number per policy layer.
  """
  saved = run.results.get("layer_costs")
  if saved is None:
    return None
  n = len(run.policy["layers"])
  if not isinstance(saved, list) or len(saved) != n or not all(
      isinstance(c, (int, float)) and not isinstance(c, bool) for c in saved):
    raise ValueError(f"results.json layer_costs is {saved!r:.80}; expected a list of "
                     f"{n} numbers (one per layer)")
  costs = np.asarray(saved, np.float64)
  if not np.isfinite(costs).all():
    raise ValueError(f"results.json layer_costs holds {costs[~np.isfinite(costs)][0]}; "
                     "expected finite numbers")
  return costs


def _bits(b: int) -> str:
  return "float" if b == FLOAT_BITS else str(b)


_pct = versus_uniform.pct


def _seconds(value) -> str:
  return "n/a" if value is None else f"{value:.0f} s"


def figures(workdir: str) -> list[tuple[str, str]]:
  """`(caption, path relative to workdir)` of the run's plots that exist."""
  plots = os.path.join(workdir, "plots")
  names = sorted(os.listdir(plots)) if os.path.isdir(plots) else []
  names = [n for n in _FIGURES if n in names] + [
      n for n in names if n.endswith(".png") and n not in _FIGURES]
  return [(_FIGURES.get(n, n[:-4].replace("_", " ")), f"plots/{n}") for n in names]


def _search_rows(run: Run) -> list[tuple[str, str]]:
  r = run.results
  if r["mode"] == "rl":
    return [("search", f"DDPG agent, {r['episodes']} episodes, best at episode "
                       f"{r['best_episode']} (reward {r['best_reward']:.3f}), "
                       f"{r['episodes_per_minute']:.1f} episodes per minute")]
  if r["mode"] == "hawq":
    converged = "converged" if r["traces_converged"] else "iteration cap reached"
    return [("search", f"Hessian traces ({r['trace_probes']} probes x "
                       f"{r['trace_iterations']} iterations, {converged}), then "
                       f"{r['allocator']} allocation, total perturbation "
                       f"{r['omega']:.4g}")]
  g = run.gumbel or {}
  rate = r.get("steps_per_second")
  return [("search", f"{g.get('gumbel_relaxation', '?')} relaxation, {r['search_steps']} "
                     f"steps ({r['search_epochs']} epochs), {g.get('gumbel_penalty', '?')} "
                     f"penalty" + (f", {rate:.2f} steps/s" if rate else "")),
          ("argmax policy cost", f"{r['argmax_cost_ratio']:.3f} x "
                                 f"{run.search['budget_reference']}"
                                 f"{' (lowered to the budget)' if r['enforced'] else ''}")]


def blocks(run: Run) -> list[tuple]:
  """The report as renderer-neutral blocks (see `haqjax.report.render`)."""
  r, unit = run.results, run.results["unit"]
  command, ran = command_of(run)
  reference = run.search["budget_reference"]
  to_budget = r["cost"] / r["limit"]
  cost = lambda value: units.format_cost(value, unit)
  label, (found_cost,) = units.format_costs([r["cost"]], unit)
  versus = versus_uniform.summary_row(r)
  timed = [k for k in _STAGES if k in r]
  out: list[tuple] = [
      ("h", 1, f"{_HEADINGS[r['mode']]}: {r['model']} on {r['dataset']}"),
      ("command", "Reproduce" if ran else "Reproduce (rebuilt from the saved configs)",
       command),
      ("kv", [("target", r["target"]),
              ("budget", f"{r['budget']} = {cost(r['limit'])}"),
              ("policy cost", f"{cost(r['cost'])} ({r['cost_ratio']:.3f} x {reference})"),
              ("FP32 test top-1", _pct(r.get("fp32_test_top1"))),
              *_search_rows(run),
              ("after fine-tune: test top-1", integer_model.final_top1(r)),
              *([versus] if versus else []),
              ("time: " + " / ".join(_STAGES[k] for k in timed),
               " / ".join(_seconds(r.get(k)) for k in timed))]),
      ("h", 2, "Accuracy and cost"),
      ("table", ("stage", "split", "top-1", f"cost ({label})", "cost / budget"),
       [("FP32", "test / val",
         f"{_pct(r.get('fp32_test_top1'))} / {_pct(r.get('fp32_val_top1'))}", "", ""),
        ("search (policy found)", "val", _pct(r.get("search_val_top1")),
         found_cost, f"{to_budget:.3f}"),
        *integer_model.accuracy_rows(r, found_cost, f"{to_budget:.3f}")]),
      ("p", f"Budget: {run.search['budget_metric']} on {r['target']}, "
            f"{run.search['budget']:g} ({run.search['budget_kind']}) x {reference} = "
            f"{cost(r['limit'])}; the policy {'fits' if r['fits'] else 'does NOT fit'} "
            f"({to_budget:.1%} of the budget, {r['cost_ratio']:.3f} x {reference})."),
      *versus_uniform.blocks(r, run.search, run.policy["layers"]),
      *integer_model.blocks(r, run.workdir),
      ("h", 2, "Timings"),
      ("table", ("stage", "seconds"),
       [(k.replace("_seconds", "").replace("_", " "), f"{r[k]:.1f}") for k in
        (*timed, "total_seconds") if k in r]),
      ("h", 2, "Plots"),
      *[("figure", caption, path) for caption, path in figures(run.workdir)],
      ("h", 2, "Policy"),
  ]
  try:
    costs = layer_costs(run)
  except ValueError as e:
    costs = None
    out.append(("p", f"Per-layer costs are unavailable: {e}"))
  else:
    if costs is None:
      out.append(("p", "Per-layer costs are not in results.json (the run predates "
                       "them); the policy is shown without them."))
  kinds = {l["name"]: l for l in run.layers}
  if costs is not None:
    # One prefix for the column, the total's: each layer reads as its share of it.
    factor, cost_label = units.scale(unit, [costs.sum()])
  rows = []
  for i, l in enumerate(run.policy["layers"]):
    shape = kinds.get(l["name"], {})
    row = [str(i), l["name"], shape.get("kind", "?"), f"{shape.get('macs', 0):,}",
           f"{shape.get('params', 0):,}", _bits(l["w_bits"]), _bits(l["a_bits"])]
    if costs is not None:
      row += [units.format_number(costs[i] * factor), f"{costs[i] / costs.sum():.1%}"]
    rows.append(tuple(row))
  head = ["#", "layer", "kind", "MACs", "params", "weight bits", "activation bits"]
  if costs is not None:
    head += [f"{run.search['budget_metric']} ({cost_label})", "share"]
    rows.append(("", "total", "", f"{sum(l['macs'] for l in run.layers):,}",
                 f"{sum(l['params'] for l in run.layers):,}", "", "",
                 units.format_number(costs.sum() * factor), "100.0%"))
  out.append(("table", tuple(head), rows))
  out += [
      ("h", 2, "Config"),
      ("table", ("config", "field", "value", "default"),
       [(s, k, json.dumps(v) if not isinstance(v, str) else v,
         json.dumps(d) if not isinstance(d, str) else d)
        for s, k, v, d in config_changes(run)]),
      ("details", "full config (config.json, search_config.json"
                  + (", gumbel_config.json)" if run.gumbel else ")"),
       json.dumps({"config": run.config, "search": run.search,
                   **({"gumbel": run.gumbel} if run.gumbel else {})}, indent=2)),
  ]
  return out


def write_report(workdir: str | os.PathLike, *, command: str | None = None
                 ) -> tuple[str, str]:
  """Writes `report.md` and `report.html` of a finished search run, atomically.

  Args:
    workdir: the run's folder (see `load_run`).
    command: the command line that ran it (default: results.json's
      "command", the last report.md's, or one rebuilt from the configs).

  Returns:
    The paths of report.md and report.html.

  Raises:
    ValueError: if `workdir` is not a finished search run.
  """
  run = load_run(workdir)
  if command:
    run = run._replace(results={**run.results, "command": command})
  doc = blocks(run)
  paths = (os.path.join(run.workdir, "report.md"), os.path.join(run.workdir, "report.html"))
  for path, text in zip(paths, (to_markdown(doc), to_html(doc, run.workdir))):
    with haq_io.atomic_open(path) as f:
      f.write(text)
  return paths
