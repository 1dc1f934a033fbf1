"""Every checked-in search recipe parses into a valid Config and SearchConfig."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("quickstart_rl", "imagenet_mobilenet_v2_haq_latency",
           "imagenet_mobilenet_v2_haq_energy", "imagenet_mobilenet_v1_haq_edge",
           "imagenet_resnet50_haq_kmeans")

# One process parses every recipe, as the launcher does, from its defaults.
_SCRIPT = """
import json, sys
from absl import flags
from experiments import job_flags
out = {}
for name in sys.argv[1:]:
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["prog", f"--flagfile=experiments/flags/{name}.flags", "--workdir=/nonexistent"])
  config = job_flags.config_from_flags()
  search = job_flags.search_from_flags()
  out[name] = {"mode": config.mode, "model": config.model, **search.to_dict(),
               "first": config.first_layer_w8, "last": config.last_layer_w8a8}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed():
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, *RECIPES], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert list(out) == list(RECIPES)
  return out


def test_recipes_are_haq_setups(parsed):
  for r in parsed.values():
    assert r["mode"] == "rl"
  q = parsed["quickstart_rl"]
  assert (q["model"], q["target"], q["budget_reference"], q["budget"]) == (
      "quickstart_cnn", "bismo-edge", "w4a4", 1.0)
  assert q["search_episodes"] >= 100
  lat = parsed["imagenet_mobilenet_v2_haq_latency"]
  assert (lat["model"], lat["target"], lat["budget_metric"], lat["budget"]) == (
      "mobilenet_v2", "bismo-cloud", "latency", 0.6)
  assert lat["first"] and lat["last"]
  energy = parsed["imagenet_mobilenet_v2_haq_energy"]
  assert (energy["target"], energy["budget_metric"]) == ("bitfusion", "energy")
  edge = parsed["imagenet_mobilenet_v1_haq_edge"]
  assert (edge["model"], edge["target"]) == ("mobilenet_v1", "bismo-edge")
  km = parsed["imagenet_resnet50_haq_kmeans"]
  assert (km["model"], km["quantization"], km["budget_metric"], km["budget"],
          km["budget_reference"]) == ("resnet50", "kmeans", "size", 0.1, "fp32")


def test_read_configs_follows_nested_flagfiles_like_absl(parsed):
  from experiments import recipes  # pylint: disable=g-import-not-at-top
  from haqjax.search.config import SearchConfig  # pylint: disable=g-import-not-at-top
  from haqjax.train.config import Config  # pylint: disable=g-import-not-at-top
  for name in RECIPES:
    config, search = recipes.read_configs(name, (Config, SearchConfig))
    want = parsed[name]
    assert (config.mode, config.model) == (want["mode"], want["model"])
    assert (config.first_layer_w8, config.last_layer_w8a8) == (want["first"], want["last"])
    # Both sides as JSON holds them (tuples as lists).
    assert json.loads(json.dumps(search.to_dict())) == {
        k: want[k] for k in search.to_dict()}, name
  config, search = recipes.read_configs("quickstart_rl", (Config, SearchConfig),
                                        epochs=1.0, search_episodes=7)
  assert config.epochs == 1.0 and search.search_episodes == 7
  with pytest.raises(ValueError, match="bogus=1 is not a field"):
    recipes.read_configs("quickstart_rl", (Config, SearchConfig), bogus=1)
