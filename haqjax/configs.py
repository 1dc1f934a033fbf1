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
