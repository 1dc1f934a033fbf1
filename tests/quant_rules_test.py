"""Declarative rules: regex -> bits and quantizers, first match wins."""

import numpy as np
import pytest

from haqjax import quant
from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy

NAMES = ("stem", "block1/expand", "block1/depthwise", "block1/project",
         "block2/depthwise", "head", "classifier")


def test_policy_from_rules_first_match_wins_per_field():
  rules = (quant.QuantRule(pattern="stem", w_bits=8, a_bits=FLOAT_BITS),
           quant.QuantRule(pattern=".*depthwise", w_bits=6),
           quant.QuantRule(pattern="block1/.*", w_bits=5, a_bits=5),
           quant.QuantRule(pattern="classifier", w_bits=8, a_bits=8))
  policy = quant.policy_from_rules(NAMES, rules, w_bits=4, a_bits=3)
  np.testing.assert_array_equal(policy.w_bits, [8, 5, 6, 5, 6, 4, 8])
  np.testing.assert_array_equal(policy.a_bits, [32, 5, 5, 5, 3, 3, 8])


def test_rules_are_full_matches_and_typos_are_errors():
  with pytest.raises(ValueError, match="rule pattern 'block' matches no layer"):
    quant.policy_from_rules(NAMES, (quant.QuantRule(pattern="block", w_bits=2),))
  with pytest.raises(ValueError, match="not a regular expression"):
    quant.QuantRule(pattern="block(", w_bits=2)
  with pytest.raises(ValueError, match="w_bits of layer 0"):
    quant.policy_from_rules(NAMES, (quant.QuantRule(pattern="stem", w_bits=9),))


def test_haq_convention_first_and_last_layers():
  policy = Policy.uniform(NAMES, 3, 4)
  fixed = quant.haq_convention(policy, first=True, last=True)
  np.testing.assert_array_equal(fixed.w_bits, [8, 3, 3, 3, 3, 3, 8])
  np.testing.assert_array_equal(fixed.a_bits, [32, 4, 4, 4, 4, 4, 8])
  stacked = Policy.create(NAMES, np.full((5, 7), 2), np.full((5, 7), 2))
  assert quant.haq_convention(stacked).w_bits[:, 0].tolist() == [8] * 5
  assert quant.haq_convention(policy, first=False).w_bits.tolist() == policy.w_bits.tolist()


def test_scheme_chooses_quantizers_per_layer():
  lsq = quant.LSQ(channel_axis=-1)
  scheme = quant.QuantScheme(
      weight=quant.MinMaxWeight(), act=quant.PACT(),
      rules=(quant.QuantRule(pattern=".*depthwise", weight=lsq),
             quant.QuantRule(pattern="stem", act=quant.MinMaxActivation())))
  assert scheme.for_layer("block2/depthwise") == (lsq, quant.PACT())
  assert scheme.for_layer("stem") == (quant.MinMaxWeight(), quant.MinMaxActivation())
  assert scheme.for_layer("head") == (quant.MinMaxWeight(), quant.PACT())
