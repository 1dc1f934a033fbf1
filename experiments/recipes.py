"""Reads the checked-in flag recipes (`experiments/flags/*.flags`) as configs.

The launcher reads them with absl's --flagfile; notebooks, benchmarks and tests
read the same files here, so a recipe has one source of truth.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from haqjax.train.config import Config

FLAGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags")


def recipe_path(name: str) -> str:
  """Path of recipe `name` ('quickstart' or 'quickstart.flags' or a path)."""
  if os.path.exists(name):
    return name
  path = os.path.join(FLAGS_DIR, name if name.endswith(".flags") else f"{name}.flags")
  if not os.path.exists(path):
    known = sorted(f[:-6] for f in os.listdir(FLAGS_DIR) if f.endswith(".flags"))
    raise ValueError(f"recipe {name!r} is unknown; allowed: {', '.join(known)}")
  return path


def _convert(field: dataclasses.Field, text: str | None) -> Any:
  kind = str(field.type)  # e.g. 'int', 'float', 'str | None', 'bool | None'.
  if "bool" in kind:
    return True if text is None else text.lower() in ("1", "true", "yes")
  if text is None:
    raise ValueError(f"flag --{field.name} needs a value")
  if kind.startswith("int"):
    return int(text)
  if kind.startswith("float"):
    value = float(text)
    return int(value) if field.name == "val_size" and value >= 1 else value
  return text


def read_recipe(name: str) -> dict[str, Any]:
  """The `--name=value` lines of a recipe as Config field values."""
  fields = {f.name: f for f in dataclasses.fields(Config)}
  values: dict[str, Any] = {}
  with open(recipe_path(name)) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith(("#", "//")):
        continue
      key, sep, text = line.lstrip("-").partition("=")
      if key.startswith("no") and key[2:] in fields and not sep:
        values[key[2:]] = False
        continue
      if key not in fields:
        raise ValueError(f"recipe {name!r}: --{key} is not a config flag")
      values[key] = _convert(fields[key], text if sep else None)
  return values


def load_recipe(name: str, **overrides: Any) -> Config:
  """The Config of recipe `name`, with `overrides` applied."""
  return Config(**{**read_recipe(name), **overrides})


__all__ = ["load_recipe", "read_recipe", "recipe_path", "FLAGS_DIR"]
