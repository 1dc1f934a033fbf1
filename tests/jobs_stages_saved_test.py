"""A search workdir's saved configs: other values are refused, newer fields read as
defaults (or as what earlier runs had)."""

import json

import pytest

from haqjax.jobs import stages
from haqjax.search.config import RESUMABLE_CHANGES
from haqjax.search.config import SearchConfig
from haqjax.search.rl.config import DDPGConfig


def _save(tmp_path, search, drop=()):
  saved = search.to_dict()
  for key in drop:
    saved["ddpg"].pop(key)
  (tmp_path / "search_config.json").write_text(json.dumps(saved))


def test_other_values_are_refused(tmp_path):
  _save(tmp_path, SearchConfig(budget=0.5))
  stages.check_saved(SearchConfig(budget=0.5), "search_config.json", RESUMABLE_CHANGES,
                     str(tmp_path))
  with pytest.raises(ValueError, match=r"holds a search with budget=0.5, not 0.6; use "
                                       r"another --workdir"):
    stages.check_saved(SearchConfig(budget=0.6), "search_config.json", RESUMABLE_CHANGES,
                       str(tmp_path))


def test_a_field_the_saved_file_lacks_reads_as_its_default(tmp_path):
  # A workdir written before `replay_actions` existed searched as its default does.
  _save(tmp_path, SearchConfig(), drop=("replay_actions",))
  stages.check_saved(SearchConfig(), "search_config.json", RESUMABLE_CHANGES, str(tmp_path))
  executed = SearchConfig(ddpg=DDPGConfig(replay_actions="executed"))
  with pytest.raises(ValueError, match="replay_actions='proposed', not 'executed'"):
    stages.check_saved(executed, "search_config.json", RESUMABLE_CHANGES, str(tmp_path))


def test_a_config_without_defaults_is_checked_as_saved(tmp_path):
  from haqjax.search.gumbel.sweep import SweepSpec
  spec = SweepSpec(axes=(("seed", (0.0, 1.0)),))
  (tmp_path / "sweep.json").write_text(json.dumps(spec.to_dict()))
  stages.check_saved(spec, "sweep.json", frozenset(), str(tmp_path))
  with pytest.raises(ValueError, match="holds a search with"):
    stages.check_saved(SweepSpec(axes=(("seed", (0.0, 2.0)),)), "sweep.json", frozenset(),
                       str(tmp_path))


def test_a_field_the_saved_file_lacks_reads_as_what_earlier_runs_had(tmp_path):
  # A Gumbel workdir written before `gumbel_quantizers` existed shared them.
  from haqjax.search.gumbel.config import GumbelConfig
  from haqjax.search.gumbel.config import RESUMABLE_CHANGES as GUMBEL_RESUMABLE
  saved = GumbelConfig().to_dict()
  saved.pop("gumbel_quantizers")
  (tmp_path / "gumbel_config.json").write_text(json.dumps(saved))
  shared = GumbelConfig(gumbel_quantizers="shared")
  stages.check_saved(shared, "gumbel_config.json", GUMBEL_RESUMABLE, str(tmp_path))
  with pytest.raises(ValueError, match="gumbel_quantizers='shared', not 'per_candidate'"):
    stages.check_saved(GumbelConfig(), "gumbel_config.json", GUMBEL_RESUMABLE,
                       str(tmp_path))
