"""What the config dataclasses share: `replace`, dicts and JSON files.

`haqjax.train.Config`, `haqjax.search.SearchConfig` and
`haqjax.search.gumbel.GumbelConfig` are frozen, keyword-only dataclasses that
validate themselves in `__post_init__`. Each inherits `JsonConfig`, which
gives all of them the same round trip:

  config.save(path)              # indented JSON, written atomically
  type(config).load(path) == config

`to_dict` is `dataclasses.asdict` (tuples stay tuples; JSON writes them as
lists), and `from_dict` turns lists back into tuples and nested dicts back
into the dataclass a field holds, so a loaded config equals the saved one.
A key that is not a field is a one-line `ValueError` naming it and the
allowed fields; a missing key takes the field's default.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from typing import Any, ClassVar, Self

from haqjax import io as haq_io


class JsonConfig:
  """Mixin of a frozen config dataclass: `replace`, `to_dict`, `from_dict`, `save`, `load`.

  Attributes:
    config_name: how error messages call this config ('config', 'search
      config', ...).
  """
  config_name: ClassVar[str] = "config"

  def replace(self, **changes: Any) -> Self:
    """A copy with `changes` (validated again)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """Field name -> value, nested dataclasses as dicts."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Self:
    """The config `d` describes (as `to_dict` or a saved JSON file gives it).

    Raises:
      ValueError: `d` has a key that is not a field, or a value the config
        does not allow.
    """
    return _from_dict(cls, d, cls.config_name)

  def save(self, path: str | os.PathLike) -> None:
    """Writes `to_dict()` as indented JSON, atomically."""
    haq_io.write_json(path, self.to_dict())

  @classmethod
  def load(cls, path: str | os.PathLike) -> Self:
    """The config saved at `path` by `save`."""
    with open(path) as f:
      return cls.from_dict(json.load(f))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
  """Each field's type, annotations resolved (modules use postponed annotations)."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _from_dict(cls: type, d: dict[str, Any], name: str) -> Any:
  types = _field_types(cls)
  unknown = sorted(set(d) - set(types))
  if unknown:
    raise ValueError(f"{name} has unknown fields {unknown}; allowed: {sorted(types)}")
  return cls(**{k: _from_json(types[k], v, f"{name} field {k}") for k, v in d.items()})


def _from_json(tp: Any, value: Any, name: str) -> Any:
  """`value` read from JSON, as a field of type `tp` holds it."""
  if isinstance(value, dict) and dataclasses.is_dataclass(tp):
    return _from_dict(tp, value, name)
  if isinstance(value, list):
    return tuple(value)
  return value


# ------------------------------------------------------------- flat views
#
# Launchers and recipes speak flat `--name=value` flags, one per leaf field:
# a nested config's fields become flags of their own, named by the nested
# class's `flag_names` (e.g. `DDPGConfig.batch_size` is `--ddpg_batch_size`),
# else by the field's own name. Tuple fields are comma-separated.


def field_type(cls: type, name: str) -> Any:
  """The resolved type of field `name` of config `cls`."""
  return _field_types(cls)[name]


def flag_fields(cls: type) -> dict[str, tuple[tuple[str, ...], Any, Any]]:
  """Flag name -> `(path of field names, type, default)` of every leaf field."""
  out: dict[str, tuple[tuple[str, ...], Any, Any]] = {}
  names = getattr(cls, "flag_names", {})
  for field in dataclasses.fields(cls):
    tp = _field_types(cls)[field.name]
    if dataclasses.is_dataclass(tp):
      for flag, (path, sub_tp, default) in flag_fields(tp).items():
        out[flag] = ((field.name, *path), sub_tp, default)
      continue
    default = (field.default_factory() if field.default is dataclasses.MISSING
               and field.default_factory is not dataclasses.MISSING else field.default)
    out[names.get(field.name, field.name)] = ((field.name,), tp, default)
  return out


def is_tuple_type(tp: Any) -> bool:
  """Whether a field of type `tp` holds a tuple (a comma-separated flag)."""
  return tp is tuple or typing.get_origin(tp) is tuple


def parse_tuple(flag: str, tp: Any, text: str) -> tuple:
  """A comma-separated flag value as the tuple a field of type `tp` holds."""
  args = [a for a in typing.get_args(tp) if a is not Ellipsis]
  item = args[0] if args else str
  try:
    return tuple(item(t) for t in str(text).split(",") if t.strip())
  except ValueError:
    raise ValueError(f"{flag}={text!r}; allowed: comma-separated {item.__name__} "
                     "values, e.g. 300,300") from None


def from_flags(cls: type, values: dict[str, Any]) -> Any:
  """The config whose leaf fields the flat `values` (flag name -> value) give.

  Missing flags take their field's default; comma-separated strings become
  the tuples tuple fields hold.
  """
  fields = flag_fields(cls)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"{getattr(cls, 'config_name', cls.__name__)} has no flags "
                     f"{unknown}; allowed: {sorted(fields)}")
  nested: dict[str, Any] = {}
  for flag, value in values.items():
    path, tp, _ = fields[flag]
    if is_tuple_type(tp) and isinstance(value, str):
      value = parse_tuple(flag, tp, value)
    node = nested
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return _build(cls, nested)


def _build(cls: type, d: dict[str, Any]) -> Any:
  types = _field_types(cls)
  return cls(**{k: _build(types[k], v) if dataclasses.is_dataclass(types[k]) else v
                for k, v in d.items()})


def flatten(cls: type, d: dict[str, Any]) -> dict[str, Any]:
  """A saved config dict (nested, as `to_dict` gives it) as flag name -> value.

  Keys that are already flag names pass through, so dicts saved before a
  config nested another read the same.
  """
  types = _field_types(cls)
  names = getattr(cls, "flag_names", {})
  out: dict[str, Any] = {}
  for key, value in d.items():
    tp = types.get(key)
    if tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, dict):
      out.update(flatten(tp, value))
    else:
      out[names.get(key, key)] = value
  return out
