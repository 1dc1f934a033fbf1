"""Tests of the config mixin: round trips, saved JSON, unknown fields."""

import dataclasses
import json

import pytest

from haqjax import configs
from haqjax.configs import JsonConfig
from haqjax.search.config import SearchConfig
from haqjax.search.gumbel.config import GumbelConfig
from haqjax.search.rl import DDPGConfig
from haqjax.train.config import Config


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Inner(JsonConfig):
  widths: tuple[int, ...] = (3, 4)
  rate: float = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Outer(JsonConfig):
  config_name = "outer config"

  name: str = "a"
  sizes: tuple[int, ...] = (1, 2)
  inner: _Inner = _Inner()
  limit: int | None = None


@pytest.mark.parametrize("config", [
    Config(mode="qat", policy="w4a4", val_size=0.1, epochs=1.5),
    SearchConfig(budget=0.3, ddpg=DDPGConfig(hidden=(64, 64))),
    GumbelConfig(gumbel_bits="2,4,8", gumbel_relaxation="softmax"),
], ids=["Config", "SearchConfig", "GumbelConfig"])
def test_round_trip_through_a_file(tmp_path, config):
  path = tmp_path / "c.json"
  config.save(path)
  assert type(config).load(path) == config
  assert json.loads(path.read_text()) == json.loads(json.dumps(config.to_dict()))
  assert config.replace() == config
  assert type(config).from_dict({}) == type(config)()  # Missing keys: defaults.


def test_to_dict_keeps_tuples_and_nests_dataclasses():
  config = _Outer(sizes=(5,), inner=_Inner(widths=(7, 8)))
  assert config.to_dict() == {"name": "a", "sizes": (5,),
                              "inner": {"widths": (7, 8), "rate": 0.5}, "limit": None}


def test_file_is_indented_json_in_field_order(tmp_path):
  _Outer(sizes=(5,)).save(tmp_path / "c.json")
  assert (tmp_path / "c.json").read_text() == (
      '{\n  "name": "a",\n  "sizes": [\n    5\n  ],\n  "inner": {\n    "widths": [\n'
      '      3,\n      4\n    ],\n    "rate": 0.5\n  },\n  "limit": null\n}\n')


def test_lists_and_nested_dicts_come_back_as_tuples_and_dataclasses(tmp_path):
  config = _Outer(sizes=(5, 6), inner=_Inner(widths=(9,), rate=0.25), limit=3)
  config.save(tmp_path / "c.json")
  loaded = _Outer.load(tmp_path / "c.json")
  assert loaded == config
  assert isinstance(loaded.sizes, tuple) and isinstance(loaded.inner, _Inner)
  assert isinstance(loaded.inner.widths, tuple)


@pytest.mark.parametrize("cls, message", [
    (Config, r"config has unknown fields \['bogus'\]; allowed: \[.*'epochs'"),
    (SearchConfig, r"search config has unknown fields \['bogus'\]; allowed: \[.*'budget'"),
    (GumbelConfig, r"gumbel config has unknown fields \['bogus'\]; allowed: \[.*'gumbel_bits'"),
    (_Outer, r"outer config has unknown fields \['bogus'\]"),
])
def test_unknown_field_is_refused(cls, message):
  with pytest.raises(ValueError, match=message):
    cls.from_dict({"bogus": 1})


def test_unknown_field_of_a_nested_config_names_its_place():
  with pytest.raises(ValueError, match=r"outer config field inner has unknown fields \['x'\]"):
    _Outer.from_dict({"inner": {"x": 1}})


def test_loaded_values_are_validated():
  with pytest.raises(ValueError, match="batch_size=-1 must be > 0"):
    Config.from_dict({"batch_size": -1})


def test_nested_config_fields_are_flags_of_their_own():
  fields = configs.flag_fields(SearchConfig)
  assert fields["ddpg_batch_size"][0] == ("ddpg", "batch_size")
  assert fields["warmup_episodes"][0] == ("ddpg", "warmup_episodes")
  assert "ddpg" not in fields and "batch_size" not in fields
  config = configs.from_flags(SearchConfig, {"budget": 0.3, "hidden": "64,64",
                                             "ddpg_batch_size": 16})
  assert config == SearchConfig(budget=0.3, ddpg=DDPGConfig(hidden=(64, 64), batch_size=16))
  flat = configs.flatten(SearchConfig, config.to_dict())
  assert flat["hidden"] == (64, 64) and flat["ddpg_batch_size"] == 16
  assert configs.from_flags(SearchConfig, flat) == config
  # A dict saved before the agent's settings nested reads the same.
  assert configs.flatten(SearchConfig, {"warmup_episodes": 3}) == {"warmup_episodes": 3}
  with pytest.raises(ValueError, match="hidden='a,b'"):
    configs.from_flags(SearchConfig, {"hidden": "a,b"})
  with pytest.raises(ValueError, match="no flags \\['batch_size'\\]"):
    configs.from_flags(SearchConfig, {"batch_size": 16})
