"""Declarative per-layer rules: layer-name regex -> bits and quantizers.

A rule matches layer names (the module paths of the layer table, e.g.
`block3/depthwise`) with `re.fullmatch`; the first rule that matches a layer
wins, field by field left unset falls through to the defaults::

    rules = (QuantRule(pattern="stem", w_bits=8, a_bits=FLOAT_BITS),
             QuantRule(pattern=".*depthwise", w_bits=6),
             QuantRule(pattern="classifier|fc", w_bits=8, a_bits=8))
    policy = policy_from_rules(table.names, rules, w_bits=4, a_bits=4)

`haq_convention` applies HAQ's usual setting (Wang et al. 2019, released
code): the first layer's weights at 8 bits with its input (the image) left in
floating point, and optionally the classifier at W8A8.

`QuantScheme` chooses the quantizer of each role (weights, activations) per
layer with the same kind of rules. A model built with `quant_scheme=...`
hands it to every `QConv`/`QDense` inside.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from haqjax.policy import FLOAT_BITS
from haqjax.policy import Policy
from haqjax.quant.base import Quantizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
  """Settings for the layers whose name fully matches `pattern`.

  Attributes:
    pattern: a regular expression matched against the whole layer name.
    w_bits, a_bits: bit-widths for matching layers (None: not set here).
    weight, act: quantizers for matching layers (None: not set here).
  """
  pattern: str
  w_bits: int | None = None
  a_bits: int | None = None
  weight: Quantizer | None = None
  act: Quantizer | None = None

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"pattern is {self.pattern!r}: not a regular expression ({e})") from None

  def matches(self, name: str) -> bool:
    return re.fullmatch(self.pattern, name) is not None


def _first(rules: Sequence[QuantRule], name: str, field: str, default):
  for rule in rules:
    value = getattr(rule, field)
    if value is not None and rule.matches(name):
      return value
  return default


def policy_from_rules(names: Sequence[str], rules: Sequence[QuantRule], *,
                      w_bits: int = 8, a_bits: int = 8) -> Policy:
  """A policy for `names`: per field, the first matching rule, else the default.

  Raises:
    ValueError: a bit-width outside 1..8 (or 32), or a rule that matches no
      layer (a typo in a pattern would otherwise pass silently).
  """
  for rule in rules:
    if not any(rule.matches(n) for n in names):
      raise ValueError(f"rule pattern {rule.pattern!r} matches no layer; layers: "
                       f"{', '.join(names)}")
  w = [_first(rules, n, "w_bits", w_bits) for n in names]
  a = [_first(rules, n, "a_bits", a_bits) for n in names]
  return Policy.create(names, w, a)


def haq_convention(policy: Policy, *, first: bool = True, last: bool = False,
                   first_bits: int = 8, last_bits: int = 8) -> Policy:
  """HAQ's fixed layers: first layer W8 on a float input; optionally last W8A8.

  Args:
    policy: a policy, `[L]` or stacked `[K, L]`.
    first: set the first layer to `w_bits=first_bits`, `a_bits=FLOAT_BITS`.
    last: set the last layer (the classifier) to `first_bits`/`last_bits`.
    first_bits, last_bits: the fixed bit-widths.

  Returns:
    The policy with those layers replaced.
  """
  w = np.array(policy.w_bits)
  a = np.array(policy.a_bits)
  if first:
    w[..., 0] = first_bits
    a[..., 0] = FLOAT_BITS
  if last:
    w[..., -1] = last_bits
    a[..., -1] = last_bits
  return Policy.create(policy.names, w, a)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantScheme:
  """The quantizer of each role, per layer.

  Attributes:
    weight: the default weight quantizer.
    act: the default input-activation quantizer.
    rules: per-layer overrides (`QuantRule.weight` / `.act`), first match wins.
  """
  weight: Quantizer
  act: Quantizer
  rules: tuple[QuantRule, ...] = ()

  def for_layer(self, name: str) -> tuple[Quantizer, Quantizer]:
    """`(weight_quantizer, act_quantizer)` of the layer `name`."""
    return (_first(self.rules, name, "weight", self.weight),
            _first(self.rules, name, "act", self.act))
