"""The recipe values the notebooks write out are the flag files' values.

quickstart.ipynb writes the quickstart recipes out as Python dicts
(`QUICKSTART`, `BUDGET`, `RL`, `GUMBEL`, and its `SMALL` setting's
digits.flags values) so that it reads no flag file. Here those dict literals
are read from the notebook's code with `ast` (nothing in the notebook runs)
and compared, value by value and flag by flag, with what
`experiments.recipes.read_configs` reads from `experiments/flags/`: a change
to a flag file that the notebook does not follow fails here.

sweeps.ipynb writes no recipe values (it reads quickstart_sweep.flags with
`read_configs`); its overrides must still name config fields, its recipes
must exist, and its budgets are the recipe's documented sweep.
"""

import ast
import json
import os
import re

import pytest

from experiments import recipes
from haqjax import configs
from haqjax.search.config import SearchConfig
from haqjax.search.gumbel import sweep as sweep_lib
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.train.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "experiments", "notebooks")
CLASSES = (Config, SearchConfig, GumbelConfig)
FIELDS = tuple(frozenset(configs.flag_fields(c)) for c in CLASSES)


def _literal(node: ast.AST, names: dict):
  """The value of a literal, a `dict(k=literal, ...)` call, or a name bound to one."""
  if isinstance(node, ast.Name) and node.id in names:
    return names[node.id]
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and node.func.id == "dict" and not node.args
      and all(kw.arg is not None for kw in node.keywords)):
    return {kw.arg: _literal(kw.value, names) for kw in node.keywords}
  if isinstance(node, ast.Tuple):
    return tuple(_literal(e, names) for e in node.elts)
  return ast.literal_eval(node)


def notebook_literals(name: str) -> dict:
  """Module-level `NAME = <literal>` assignments of a notebook's code cells.

  Assignments whose value is not a literal (a function call, an expression
  over variables) are skipped.
  """
  with open(os.path.join(NOTEBOOK_DIR, name)) as f:
    cells = json.load(f)["cells"]
  names = {}
  for cell in cells:
    if cell["cell_type"] != "code":
      continue
    for stmt in ast.parse("".join(cell["source"])).body:
      if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
          and isinstance(stmt.targets[0], ast.Name)):
        try:
          names[stmt.targets[0].id] = _literal(stmt.value, names)
        except (ValueError, TypeError, SyntaxError):
          pass
  return names


def _recipe_values(recipe: str) -> dict:
  """Every flag's value in the recipe's (Config, SearchConfig, GumbelConfig)."""
  out = {}
  for config in recipes.read_configs(recipe, CLASSES):
    out.update(configs.flatten(type(config), config.to_dict()))
  return out


def _flag_names(recipe: str) -> set:
  """The flags the recipe sets, nested flag files followed."""
  return set(recipes.read_flags(recipes.recipe_path(recipe)))


@pytest.fixture(scope="module")
def quickstart():
  return notebook_literals("quickstart.ipynb")


@pytest.mark.parametrize("recipe, dicts", [
    ("quickstart", ("QUICKSTART",)),
    ("quickstart_rl", ("QUICKSTART", "BUDGET", "RL")),
    ("quickstart_gumbel", ("QUICKSTART", "BUDGET", "GUMBEL")),
])
def test_quickstart_notebook_values_are_the_recipe(quickstart, recipe, dicts):
  written = {}
  for name in dicts:
    assert isinstance(quickstart.get(name), dict), f"quickstart.ipynb has no dict {name}"
    overlap = set(written) & set(quickstart[name])
    assert not overlap, f"{name} repeats {sorted(overlap)}"
    written.update(quickstart[name])
  expected = _recipe_values(recipe)
  wrong = {k: (v, expected.get(k, "not a config field")) for k, v in written.items()
           if k not in expected or expected[k] != v}
  assert not wrong, (f"quickstart.ipynb's {'+'.join(dicts)} differ from {recipe}.flags "
                     f"(notebook, flags): {wrong}")
  # Every flag the recipe sets is written out (the notebook sets the mode per stage).
  flags = _flag_names(recipe) - {"mode"}
  assert set(written) == flags, (
      f"{recipe}.flags sets {sorted(flags - set(written))} that quickstart.ipynb does not "
      f"write out; the notebook writes {sorted(set(written) - flags)} that it does not set")


def test_quickstart_small_setting_is_the_digits_recipe(quickstart):
  """SMALL's FP32 stage is digits.flags (QUICKSTART with SMALL's overrides),
  trained for fewer epochs: SMALL is the tests' smoke run."""
  merged = {**quickstart["QUICKSTART"], **quickstart["SMALL"]["config"]}
  expected = _recipe_values("digits")
  wrong = {k: (merged.get(k, "not written"), expected[k])
           for k in _flag_names("digits") - {"mode", "epochs"} if merged.get(k) != expected[k]}
  assert not wrong, f"quickstart.ipynb's SMALL differs from digits.flags: {wrong}"
  assert 0 < merged["epochs"] <= expected["epochs"]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "sweeps.ipynb"])
def test_notebook_settings_override_config_fields(name):
  values = notebook_literals(name)
  settings = {s: values[s] for s in ("SMALL", "MEDIUM", "LARGE")}
  for setting, s in settings.items():
    if name == "quickstart.ipynb":
      groups = [(s["config"], FIELDS[0]), (s["search"], FIELDS[1]), (s["gumbel"], FIELDS[2])]
    else:
      groups = [(s["overrides"], frozenset().union(*FIELDS))]
      for recipe in s["recipes"]:
        recipes.recipe_path(recipe)  # Raises ValueError for an unknown recipe.
      assert set(s["sweep"]) <= set(sweep_lib.AXES), (setting, s["sweep"])
    for overrides, fields in groups:
      unknown = set(overrides) - fields
      assert not unknown, f"{name} {setting}: {sorted(unknown)} are not config fields"
    for policy in s["uniform"]:
      assert re.fullmatch(r"w[1-8]a[1-8]", policy), (setting, policy)


def test_sweeps_notebook_uses_the_recipe_and_its_sweep():
  values = notebook_literals("sweeps.ipynb")
  path = recipes.recipe_path(values["RECIPE"])
  _, _, gumbel = recipes.read_configs(values["RECIPE"], CLASSES)
  assert gumbel.gumbel_epochs == 0.5  # The fast sweep recipe.
  # The budgets of the recipe's documented command are MEDIUM's and LARGE's.
  with open(path) as f:
    documented = re.search(r"--sweep\.budget=([\d.,]+)", f.read())
  assert documented, f"{path} documents no --sweep.budget"
  budgets = tuple(float(v) for v in documented.group(1).split(","))
  assert values["MEDIUM"]["sweep"]["budget"] == budgets
  assert values["LARGE"]["sweep"]["budget"] == budgets
  # Nothing written out: no dict of the notebook repeats a recipe value.
  flags = _flag_names(values["RECIPE"]) - {"mode"}
  written = [k for k, v in values.items() if isinstance(v, dict) and set(v) & flags]
  assert not written, f"sweeps.ipynb writes out recipe values in {written}; test them here"
