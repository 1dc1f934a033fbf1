"""The bit policy: per-layer weight and activation bit-widths as data.

A `Policy` holds two integer arrays, `w_bits` and `a_bits`, one entry per
quantizable layer in the order of the model's layer table, plus the layer
names (static). Because the bits are array leaves, one compiled function
serves every policy, and `jax.vmap` over a stacked policy runs many policies
in one call::

    table = haqjax.nn.layer_table(model, (1, 28, 28, 1))
    policy = Policy.uniform(table.names, w_bits=4, a_bits=4)
    logits = model.apply(variables, images, policy=policy)

The readable JSON form (one object per layer, in table order) is what training,
search, the cost model, reports and export read and write::

    {"format": "haqjax.policy/1",
     "layers": [{"name": "conv1", "w_bits": 8, "a_bits": 32}, ...]}

An a/w bit-width of `FLOAT_BITS` (32) means "leave this tensor in floating
point", which is how HAQ's unquantized network input is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np

from haqjax import io as haq_io
from haqjax.bitwidths import FLOAT_BITS
from haqjax.typing import Array, ArrayLike

FORMAT = "haqjax.policy/1"
MIN_BITS = 1
MAX_BITS = 8


def _check_bits(field: str, values: np.ndarray, names: Sequence[str]) -> None:
  ok = ((values >= MIN_BITS) & (values <= MAX_BITS)) | (values == FLOAT_BITS)
  if not ok.all():
    i = int(np.argmin(ok))
    raise ValueError(
        f"{field} of layer {i} ({names[i]!r}) is {values[i]}; allowed: "
        f"{MIN_BITS}..{MAX_BITS}, or {FLOAT_BITS} for floating point")


@flax.struct.dataclass
class Policy:
  """Per-layer bit-widths. Leaves: `w_bits` and `a_bits`, int32 `[..., L]`.

  Attributes:
    w_bits: weight bit-width per layer, `[L]` (or `[K, L]` when stacked).
    a_bits: input-activation bit-width per layer, same shape.
    names: layer names in layer-table order (static, part of the treedef).
  """
  w_bits: Array
  a_bits: Array
  names: tuple[str, ...] = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, names: Sequence[str], w_bits: ArrayLike,
             a_bits: ArrayLike) -> Policy:
    """Builds a validated policy from per-layer bits (scalars broadcast)."""
    names = tuple(names)
    w, a = np.asarray(w_bits), np.asarray(a_bits)
    for field, v in (("w_bits", w), ("a_bits", a)):
      if v.ndim and v.shape[-1] != len(names):
        raise ValueError(f"{field} has {v.shape[-1]} entries; the model has "
                         f"{len(names)} quantizable layers")
      if not np.issubdtype(v.dtype, np.integer) and not np.all(v == np.round(v)):
        raise ValueError(f"{field} must be whole numbers; got {v.tolist()}")
    shape = np.broadcast_shapes(w.shape, a.shape, (len(names),))
    w = np.broadcast_to(w, shape).astype(np.int64)
    a = np.broadcast_to(a, shape).astype(np.int64)
    for row_w, row_a in zip(w.reshape(-1, len(names)), a.reshape(-1, len(names))):
      _check_bits("w_bits", row_w, names)
      _check_bits("a_bits", row_a, names)
    return cls(w_bits=jnp.asarray(w, jnp.int32),
               a_bits=jnp.asarray(a, jnp.int32), names=names)

  @classmethod
  def uniform(cls, names: Sequence[str], w_bits: int, a_bits: int) -> Policy:
    """The same bit-widths for every layer (e.g. W4A4)."""
    return cls.create(names, w_bits, a_bits)

  def __len__(self) -> int:
    return len(self.names)

  def index(self, name: str) -> int:
    """Position of layer `name` in the policy (a static Python int)."""
    try:
      return self.names.index(name)
    except ValueError:
      raise ValueError(
          f"layer {name!r} is not in the policy; policy layers: "
          f"{', '.join(self.names[:6])}{' ...' if len(self.names) > 6 else ''}"
      ) from None

  def bits_for(self, name: str) -> tuple[Array, Array]:
    """(w_bits, a_bits) of layer `name`, as traced scalars."""
    i = self.index(name)
    return self.w_bits[..., i], self.a_bits[..., i]

  def to_dict(self, **meta: Any) -> dict[str, Any]:
    """The readable JSON form; `meta` keys are stored beside the layers."""
    w = np.asarray(self.w_bits)
    a = np.asarray(self.a_bits)
    if w.ndim != 1:
      raise ValueError(f"only a single policy can be written; w_bits has shape {w.shape}")
    layers = [{"name": n, "w_bits": int(wb), "a_bits": int(ab)}
              for n, wb, ab in zip(self.names, w, a)]
    return {"format": FORMAT, **meta, "layers": layers}

  @classmethod
  def from_dict(cls, d: Any, names: Sequence[str] | None = None,
                source: str = "policy") -> Policy:
    """Reads the JSON form; checks it against the model's layer `names`."""
    if not isinstance(d, dict) or not isinstance(d.get("layers"), list):
      raise ValueError(f"{source}: expected an object with a 'layers' list "
                       f"(format {FORMAT!r})")
    layers = d["layers"]
    for i, layer in enumerate(layers):
      if not isinstance(layer, dict) or not {"w_bits", "a_bits"} <= set(layer):
        raise ValueError(f"{source}: layers[{i}] must have 'w_bits' and 'a_bits'")
      for key in ("w_bits", "a_bits"):
        if not isinstance(layer[key], int) or isinstance(layer[key], bool):
          raise ValueError(f"{source}: layers[{i}].{key} is {layer[key]!r}; "
                           f"allowed: an integer {MIN_BITS}..{MAX_BITS} or {FLOAT_BITS}")
    file_names = [layer.get("name", f"layer{i}") for i, layer in enumerate(layers)]
    if names is not None:
      names = tuple(names)
      if len(layers) != len(names):
        raise ValueError(f"{source} has {len(layers)} layers; the model has "
                         f"{len(names)} quantizable layers")
      for i, (got, want) in enumerate(zip(file_names, names)):
        if "name" in layers[i] and got != want:
          raise ValueError(f"{source}: layers[{i}].name is {got!r}; the model's "
                           f"layer {i} is {want!r}")
    else:
      names = tuple(file_names)
    try:
      return cls.create(names, [l["w_bits"] for l in layers],
                        [l["a_bits"] for l in layers])
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None


@flax.struct.dataclass
class SoftPolicy:
  """Per-layer distributions over candidate bit-widths: a relaxed `Policy`.

  What a differentiable bit search (DNAS, EdMIPS) passes to the model in
  place of a `Policy`: layer `l` quantizes its kernel to the mixture
  `sum_k w_probs[l, k] * Q(W, w_bits[l, k])` and its input to
  `sum_k a_probs[l, k] * Q(x, a_bits[l, k])`, then runs one convolution on
  the mixed tensors (EdMIPS's "composite" form, so a step costs one
  convolution per layer however many candidates there are). At one-hot
  probabilities this is the `Policy` of the chosen bits.

  Candidates are per layer (`[L, K]`) so that layers fixed by convention (the
  first layer's float input, `FLOAT_BITS`, which no candidate set holds) are
  rows of one repeated bit-width. All four fields are array leaves: one
  compiled step serves every distribution and candidate set of a shape.

  With `per_candidate`, every layer holds one set of quantizer parameters per
  candidate, stacked on a leading `[K]` axis of each parameter
  (`haqjax.nn.calibrate.calibrate_candidates` makes them), and candidate `k`
  is quantized with set `k`: a quantizer per bit-width, as EdMIPS keeps one.
  Without it every candidate shares the layer's one set, which suits
  quantizers whose range does not depend on the bit-width (min-max) but not
  a learned step: a step calibrated at 8 bits clips a 2-bit grid at three
  steps.

  Example::

      soft = SoftPolicy.create(table.names, w_probs, a_probs, bits=(2, 4, 8))
      logits = model.apply(variables, images, policy=soft)

  Attributes:
    w_probs: `[L, K]` weight bit-width probabilities (rows sum to 1).
    a_probs: `[L, K]` input-activation bit-width probabilities.
    w_bits: `[L, K]` int32 candidate weight bit-widths per layer.
    a_bits: `[L, K]` int32 candidate activation bit-widths per layer.
    names: layer names in layer-table order (static).
    per_candidate: quantizer parameters hold one set per candidate (static).

  References:
    Wu et al. Mixed Precision Quantization of ConvNets via Differentiable
    Neural Architecture Search. 2018. https://arxiv.org/abs/1812.00090
    Cai & Vasconcelos. Rethinking Differentiable Search for Mixed-Precision
    Neural Networks. CVPR 2020. https://arxiv.org/abs/2004.05795
  """
  w_probs: Array
  a_probs: Array
  w_bits: Array
  a_bits: Array
  names: tuple[str, ...] = flax.struct.field(pytree_node=False)
  per_candidate: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def create(cls, names: Sequence[str], w_probs: ArrayLike, a_probs: ArrayLike,
             bits: ArrayLike, a_bits: ArrayLike | None = None, *,
             per_candidate: bool = False) -> SoftPolicy:
    """A soft policy over candidates `bits` (`[K]` or per layer `[L, K]`).

    `a_bits` defaults to `bits`. Probabilities are not renormalised.
    """
    names = tuple(names)
    shape = (len(names), np.shape(bits)[-1])
    w_bits = np.broadcast_to(np.asarray(bits, np.int64), shape)
    a_bits = np.broadcast_to(np.asarray(bits if a_bits is None else a_bits, np.int64),
                             shape)
    for field, v in (("w_bits", w_bits), ("a_bits", a_bits)):
      for row in v.T:
        _check_bits(field, row, names)
    for field, p in (("w_probs", w_probs), ("a_probs", a_probs)):
      if np.shape(p) != shape:
        raise ValueError(f"{field} has shape {np.shape(p)}; allowed: {shape} "
                         "(layers, candidates)")
    return cls(w_probs=jnp.asarray(w_probs, jnp.float32),
               a_probs=jnp.asarray(a_probs, jnp.float32),
               w_bits=jnp.asarray(w_bits, jnp.int32), a_bits=jnp.asarray(a_bits, jnp.int32),
               names=names, per_candidate=per_candidate)

  @classmethod
  def from_policy(cls, policy: Policy, bits: ArrayLike) -> SoftPolicy:
    """The one-hot soft policy equal to `policy`, over candidates `bits` `[K]`.

    A layer whose bits are not among the candidates (e.g. a float input) gets
    a row of its own bits.
    """
    bits = np.asarray(bits, np.int64)  # [K]
    rows = {}
    for field in ("w_bits", "a_bits"):
      b = np.asarray(getattr(policy, field), np.int64)[:, None]  # [L, 1]
      hit = bits[None, :] == b  # [L, K]
      first = np.argmax(hit, axis=-1)
      probs = np.eye(bits.size)[np.where(hit.any(-1), first, 0)]
      rows[field] = (np.where(hit.any(-1, keepdims=True), bits[None, :], b), probs)
    return cls.create(policy.names, rows["w_bits"][1], rows["a_bits"][1],
                      rows["w_bits"][0], rows["a_bits"][0])

  def __len__(self) -> int:
    return len(self.names)

  def candidates_for(self, name: str) -> tuple[Array, Array, Array, Array]:
    """`(w_bits, w_probs, a_bits, a_probs)` of layer `name`, `[K]` each."""
    try:
      i = self.names.index(name)
    except ValueError:
      raise ValueError(f"layer {name!r} is not in the soft policy") from None
    return self.w_bits[i], self.w_probs[i], self.a_bits[i], self.a_probs[i]


def load_policy(path: str | os.PathLike, names: Sequence[str] | None = None) -> Policy:
  """Loads a policy JSON file, validated against the model's layer names."""
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"policy file {os.fspath(path)!r} does not exist") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"policy file {os.fspath(path)!r} is not valid JSON: {e}") from None
  return Policy.from_dict(d, names, source=os.fspath(path))


def save_policy(path: str | os.PathLike, policy: Policy, **meta: Any) -> None:
  """Writes the policy's JSON form atomically."""
  haq_io.write_json(path, policy.to_dict(**meta))
