"""Reads the checked-in flag recipes (`experiments/flags/*.flags`) as configs.

The launcher reads them with absl's --flagfile; notebooks, benchmarks and tests
read the same files here, so a recipe has one source of truth.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
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


def read_flags(path: str) -> dict[str, str | None]:
  """`--name=value` lines of a flag file, following --flagfile (absl order)."""
  repo = os.path.dirname(os.path.dirname(FLAGS_DIR))
  values: dict[str, str | None] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith(("#", "//")):
        continue
      key, sep, text = line.lstrip("-").partition("=")
      if key == "flagfile":
        nested = text if os.path.isabs(text) else os.path.join(repo, text)
        values.update(read_flags(nested))
      else:
        values[key] = text if sep else None
  return values


def _convert_flag(name: str, tp: Any, text: str | None) -> Any:
  """A recipe's `--name=text` as the value of a field of (resolved) type `tp`."""
  from haqjax import configs  # pylint: disable=g-import-not-at-top
  args = [a for a in typing.get_args(tp) if a is not type(None)]
  if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
    tp = args[0]
  if tp is bool:
    return True if text is None else text.lower() in ("1", "true", "yes")
  if text is None:
    raise ValueError(f"flag --{name} needs a value")
  if tp is int:
    return int(text)
  if tp is float:
    value = float(text)
    return int(value) if name == "val_size" and value >= 1 else value
  if configs.is_tuple_type(tp):
    return configs.parse_tuple(name, tp, text)
  return text


def read_configs(name: str, classes: tuple[type, ...], **overrides: Any) -> tuple:
  """One config per dataclass in `classes` from recipe `name` (nested flagfiles
  followed); each flag and override goes to the first class with that flag
  (a nested config's fields are flags of their own, as the launcher defines
  them: `haqjax.configs.flag_fields`).

  Example: `Config, SearchConfig = read_configs("quickstart_rl", (Config, SearchConfig))`.
  """
  from haqjax import configs  # pylint: disable=g-import-not-at-top
  groups = tuple(configs.flag_fields(c) for c in classes)
  values: tuple[dict[str, Any], ...] = tuple({} for _ in classes)
  for key, text in read_flags(recipe_path(name)).items():
    negated = key.startswith("no") and text is None
    for fields, out in zip(groups, values):
      flag = key[2:] if negated and key[2:] in fields else key
      if flag in fields:
        out[flag] = False if negated else _convert_flag(flag, fields[flag][1], text)
        break
    else:
      raise ValueError(f"recipe {name!r}: --{key} is not a config flag")
  for key, value in overrides.items():
    owner = next((i for i, g in enumerate(groups) if key in g), None)
    if owner is None:
      raise ValueError(f"{key}={value!r} is not a field of "
                       f"{', '.join(c.__name__ for c in classes)}")
    values[owner][key] = value
  return tuple(configs.from_flags(c, v) for c, v in zip(classes, values))


__all__ = ["load_recipe", "read_configs", "read_flags", "read_recipe", "recipe_path",
           "FLAGS_DIR"]
