"""Every `haqjax.x.y` name the docs use resolves, as a user would reach it.

The docs are README.md and experiments/RESULTS.md (the comparison's record).

A name resolves attribute by attribute from `import haqjax`; a part that is
not an attribute may be a submodule (`import haqjax.ptq.folding`), but a
function or class must be exported where the README names it:
`haqjax.ptq.ptq` needs `ptq` in `haqjax/ptq/__init__.py`.
"""

import importlib
import os
import re
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A dotted name starting at haqjax (a trailing '.' or '(' is not part of it).
_NAME = re.compile(r"\bhaqjax(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


DOCS = ("README.md", os.path.join("experiments", "RESULTS.md"))


def readme_names() -> list[str]:
  names = set()
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      names.update(_NAME.findall(f.read()))
  return sorted(names)


def resolve(name: str):
  """The object `name` denotes; raises AttributeError naming the missing part."""
  parts = name.split(".")
  obj = importlib.import_module(parts[0])
  for i, part in enumerate(parts[1:], start=1):
    if hasattr(obj, part):
      obj = getattr(obj, part)
      continue
    if isinstance(obj, types.ModuleType) and hasattr(obj, "__path__"):
      try:  # A submodule of a package, reached by `import haqjax.a.b`.
        obj = importlib.import_module(f"{obj.__name__}.{part}")
        continue
      except ModuleNotFoundError as e:
        if e.name != f"{obj.__name__}.{part}":
          raise
    raise AttributeError(f"README.md names {name}, but {'.'.join(parts[:i])} has no "
                         f"{part!r}")
  return obj


def test_the_readme_names_the_public_api():
  names = readme_names()
  # The names the README's prose and examples lean on, at least these.
  for name in ("haqjax.ptq.ptq", "haqjax.layer_table", "haqjax.Policy",
               "haqjax.train.train_and_evaluate", "haqjax.search_policy"):
    assert name in names, name


@pytest.mark.parametrize("name", readme_names())
def test_readme_name_resolves(name):
  resolve(name)


def test_a_missing_name_fails():
  with pytest.raises(AttributeError, match="haqjax.ptq has no 'no_such_flow'"):
    resolve("haqjax.ptq.no_such_flow")
  with pytest.raises(AttributeError, match="no 'nothing_here'"):
    resolve("haqjax.nothing_here")


def test_package_exports_the_readme_uses():
  import haqjax  # pylint: disable=g-import-not-at-top
  import haqjax.ptq  # pylint: disable=g-import-not-at-top
  assert callable(haqjax.ptq.ptq) and haqjax.ptq.PTQOptions and haqjax.ptq.PTQScorer
  assert callable(haqjax.ptq.fold_batch_norms)
  assert callable(haqjax.search_policy) and callable(haqjax.quantize)
