"""Tests of the policy format (haqjax/policy.py)."""

import json

import jax
import numpy as np
import pytest

from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy
from haqjax.policy import load_policy
from haqjax.policy import save_policy

NAMES = ("stem", "block1/conv", "classifier")


def test_uniform_and_bits_for():
  p = Policy.uniform(NAMES, 4, 6)
  assert len(p) == 3
  assert p.w_bits.dtype == np.int32
  w, a = p.bits_for("block1/conv")
  assert (int(w), int(a)) == (4, 6)


def test_create_broadcasts_and_stacks():
  p = Policy.create(NAMES, [[2, 3, 4], [5, 6, 7]], 8)
  assert p.w_bits.shape == p.a_bits.shape == (2, 3)
  np.testing.assert_array_equal(p.a_bits, 8)
  # A stacked policy is one pytree: vmap slices it into single policies.
  firsts = jax.vmap(lambda q: q.w_bits[0])(p)
  np.testing.assert_array_equal(firsts, [2, 5])


@pytest.mark.parametrize("kwargs, message", [
    (dict(w_bits=[1, 2], a_bits=4), "w_bits has 2 entries; the model has 3"),
    (dict(w_bits=9, a_bits=4), "w_bits of layer 0 ('stem') is 9; allowed: 1..8"),
    (dict(w_bits=4, a_bits=[4, 0, 4]), "a_bits of layer 1 ('block1/conv') is 0"),
    (dict(w_bits=2.5, a_bits=4), "w_bits must be whole numbers"),
])
def test_create_rejects(kwargs, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    Policy.create(NAMES, **kwargs)


def test_float_bits_allowed():
  p = Policy.create(NAMES, 8, [FLOAT_BITS, 4, 8])
  assert int(p.a_bits[0]) == FLOAT_BITS


def test_unknown_layer():
  with pytest.raises(ValueError, match="layer 'nope' is not in the policy"):
    Policy.uniform(NAMES, 4, 4).index("nope")


def test_json_round_trip(tmp_path):
  p = Policy.create(NAMES, [8, 3, 5], [32, 4, 6])
  path = tmp_path / "policy.json"
  save_policy(path, p, model="toy")
  d = json.loads(path.read_text())
  assert d["format"] == "haqjax.policy/1" and d["model"] == "toy"
  assert d["layers"][1] == {"name": "block1/conv", "w_bits": 3, "a_bits": 4}
  q = load_policy(path, NAMES)
  np.testing.assert_array_equal(q.w_bits, p.w_bits)
  np.testing.assert_array_equal(q.a_bits, p.a_bits)
  assert q.names == NAMES
  assert not list(tmp_path.glob(".*tmp"))  # No temporary file left behind.


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"layers": 3}', "expected an object with a 'layers' list"),
    ('{"layers": [{"w_bits": 4, "a_bits": 4}]}', "has 1 layers; the model has 3"),
    ('{"layers": [{"name": "stem", "w_bits": 4, "a_bits": 4},'
     ' {"name": "x", "w_bits": 4, "a_bits": 4},'
     ' {"name": "classifier", "w_bits": 4, "a_bits": 4}]}',
     r"layers\[1\].name is 'x'; the model's layer 1 is 'block1/conv'"),
    ('{"layers": [{"w_bits": 4, "a_bits": 4}, {"w_bits": 12, "a_bits": 4},'
     ' {"w_bits": 4, "a_bits": 4}]}', "w_bits of layer 1 .* is 12"),
    ('{"layers": [{"w_bits": "4", "a_bits": 4}, {"w_bits": 4, "a_bits": 4},'
     ' {"w_bits": 4, "a_bits": 4}]}', r"layers\[0\].w_bits is '4'"),
])
def test_load_rejects(tmp_path, content, message):
  path = tmp_path / "p.json"
  path.write_text(content)
  with pytest.raises(ValueError, match=message):
    load_policy(path, NAMES)


def test_load_missing_file(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    load_policy(tmp_path / "none.json", NAMES)
