"""Tests of the training config and the flag recipes."""

import pytest

from experiments import recipes
from haqjax.train.config import Config


@pytest.mark.parametrize("changes, message", [
    (dict(mode="search"), "mode='search' is not allowed; allowed: train, qat"),
    (dict(batch_size=-8), "batch_size=-8 must be > 0"),
    (dict(epochs=0), "epochs=0 must be > 0"),
    (dict(optimizer="lamb"), "optimizer='lamb' is not allowed"),
    (dict(momentum=1.0), r"momentum=1.0 must be in \[0, 1\)"),
    (dict(val_size=-1), "val_size=-1 must be >= 0"),
    (dict(warmup_epochs=20, epochs=10), "warmup_epochs=20 must be <= epochs=10"),
    (dict(mode="qat"), "mode 'qat' needs a policy"),
    (dict(mode="qat", policy="w9a4"), "w bits 9 is outside 1..8"),
    (dict(mode="qat", policy="w4a0"), "a bits 0 is outside 1..8"),
    (dict(mode="qat", policy="/no/such.json"), "neither 'wXaY'"),
    (dict(dtype="float16"), "dtype='float16' is not allowed"),
])
def test_invalid(changes, message):
  with pytest.raises(ValueError, match=message):
    Config(**changes)


def test_uniform_bits_and_round_trip(tmp_path):
  c = Config(mode="qat", policy="W4A8", epochs=1)
  assert c.uniform_bits() == (4, 8)
  c.save(tmp_path / "config.json")
  assert Config.load(tmp_path / "config.json") == c
  with pytest.raises(ValueError, match="unknown fields"):
    Config.from_dict({"epochs": 1, "bogus": 2})


@pytest.mark.parametrize("name", ["quickstart", "quickstart_qat", "digits",
                                  "cifar10_resnet20", "imagenet_mobilenet_v2",
                                  "imagenet_resnet50"])
def test_every_recipe_is_a_valid_config(name):
  config = recipes.load_recipe(name)
  assert config.epochs > 0


def test_unknown_recipe():
  with pytest.raises(ValueError, match="recipe 'nope' is unknown; allowed: .*quickstart"):
    recipes.load_recipe("nope")
