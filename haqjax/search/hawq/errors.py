"""The quantization errors of HAWQ's sensitivity table, per tensor or per channel.

`quantization_mse` measures, for every quantizable layer and candidate
bit-width, the mean squared error its own quantizers add (the weight
quantizer on the kernel; the activation quantizer on the recorded inputs,
each batch on its own, as training quantizes them), per tensor or per
channel (a kernel's output channels, an input's channels: the last axis).
`channel_weighted` folds per-channel errors into one trace-weighted error
per layer. See `haqjax.search.hawq.sensitivity` for how they enter `Omega`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from haqjax.bitwidths import FLOAT_BITS
from haqjax.hardware.budget import TABLE_BITS
from haqjax.hardware.budget import table_index
from haqjax.search.hawq import hutchinson
from haqjax.treeutil import get_path
from haqjax.typing import Array
from haqjax.typing import PRNGKey
from haqjax.typing import PyTree


def _calibrated(quantizer, x: Array, bits: Array) -> PyTree:
  """`quantizer`'s parameters calibrated on `x` at `bits`."""
  return quantizer.calibrate(quantizer.init(x), x, bits)


def _parts_mse(quantizer, params: PyTree, parts: Array, bits: Array, key: PRNGKey,
               channels: bool = False) -> Array:
  """Mean squared error of `quantizer` at `params`, `bits` over `parts` `[n, ...]`
  (`channels`: per channel of a part's last axis, `[C]`)."""
  keys = jax.random.split(key, parts.shape[0])

  def error(part, k):
    q = quantizer(params, part, bits, k if quantizer.needs_key else None)
    if channels:
      return jnp.mean(jnp.square(q - part).reshape(-1, hutchinson.channel_count(part.shape)),
                      axis=0)
    return jnp.mean(jnp.square(q - part))
  return jnp.mean(jax.vmap(error)(parts, keys), axis=0)


def _mse(quantizer, x: Array, parts: Array, bits: Array, key: PRNGKey,
         channels: bool = False) -> Array:
  """`_parts_mse` of `quantizer` calibrated on `x` at `bits`."""
  return _parts_mse(quantizer, _calibrated(quantizer, x, bits), parts, bits, key, channels)


_jitted_mse = jax.jit(_mse, static_argnums=(0, 5))
_jitted_parts_mse = jax.jit(_parts_mse, static_argnums=(0, 5))
# What tracing a quantizer's `calibrate` raises when it needs concrete data
# (e.g. a grid picked from the data's sign).
_UNTRACEABLE = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                jax.errors.TracerIntegerConversionError, jax.errors.TracerBoolConversionError)
# Quantizers (hashable, equal by value) whose calibration could not be traced.
_TRACEABLE: dict[Any, bool] = {}


def _error(quantizer, x: Array, parts: Array, bits: int, key: PRNGKey,
           channels: bool = False) -> np.ndarray:
  """`_mse`, compiled once per quantizer and shape (any bits).

  A quantizer whose calibration needs concrete data is calibrated op by op
  and its error compiled with the parameters as data (run op by op, the
  vmapped error took longer than the Hessian traces on digits_cnn); an
  unhashable one runs op by op.
  """
  b = jnp.int32(bits)
  try:
    hash(quantizer)
  except TypeError:  # A quantizer holding arrays cannot be a static argument.
    return np.asarray(_mse(quantizer, x, parts, b, key, channels), np.float64)
  if _TRACEABLE.get(quantizer, True):
    try:
      return np.asarray(_jitted_mse(quantizer, x, parts, b, key, channels), np.float64)
    except _UNTRACEABLE:
      _TRACEABLE[quantizer] = False  # Not traced again for other bits and layers.
  return np.asarray(_jitted_parts_mse(quantizer, _calibrated(quantizer, x, b), parts, b,
                                      key, channels), np.float64)


def _error_key(key: PRNGKey, layer: int, bits: Array) -> PRNGKey:
  """Layer `layer`'s key at `bits`: the same inside a program and outside."""
  return jax.random.fold_in(jax.random.fold_in(key, layer), bits)


def _role_table(quantizers: tuple, xs: tuple[Array, ...], parts: tuple[Array, ...],
                bits: Array, key: PRNGKey, channels: bool = False) -> tuple[Array, ...]:
  """Per layer `[K]` (`channels`: `[K, C_l]`): `_mse` of its quantizer at every
  one of `bits` `[K]`.

  One program for all layers, the bits looped in it (`lax.map`: one
  bit-width's intermediates at a time, as a layer-by-layer loop would
  hold).
  """
  return tuple(
      jax.lax.map(lambda b, l=l, q=q, x=x, p=p: _mse(q, x, p, b, _error_key(key, l, b),
                                                    channels), bits)
      for l, (q, x, p) in enumerate(zip(quantizers, xs, parts)))


_jitted_role_table = jax.jit(_role_table, static_argnums=(0, 5))


def _role_operands(role: str, variables: PyTree, recorded: dict[str, dict[str, Any]],
                   num_batches: int) -> list[tuple[Any, Array, Array]]:
  """Per layer: the quantizer, the data it is calibrated on, and its parts `[n, ...]`."""
  out = []
  for entry in recorded.values():
    weight_q, act_q = entry["quantizers"]
    if role == "weight" and "rhs_inputs" not in entry:
      x = get_path(variables["params"], entry["path"])["kernel"]
      out.append((weight_q, x, x[None]))
    else:  # An activation, or a matmul's second operand (its weight_q is act_q).
      quantizer = act_q if role == "activation" else weight_q
      x = jnp.asarray(entry["inputs" if role == "activation" else "rhs_inputs"])
      out.append((quantizer, x, x.reshape(num_batches, -1, *x.shape[1:])))  # [n, B, ...]
  return out


def quantization_mse(key: PRNGKey, variables: PyTree, recorded: dict[str, dict[str, Any]],
                     *, num_batches: int, w_bits: Sequence[int], a_bits: Sequence[int],
                     channels: bool = False) -> tuple[Any, Any]:
  """Per-element squared errors `(w [L, 9], a [L, 9])` over `TABLE_BITS`.

  With `channels`, each role is a list of per-layer `[9, C_l]` tables: the
  errors per channel (a kernel's output channels, an input's channels).

  Each role's table is one compiled program for all layers and bits when
  every quantizer is hashable and its calibration traces; otherwise
  layer by layer (`_error`).

  Args:
    key: for quantizers that round stochastically.
    variables: the model's variables (FP32 kernels).
    recorded: `record(model, variables, batches)`.
    num_batches: how many batches (of one size) `recorded` concatenates;
      each batch's activations are quantized on their own, as in training.
    w_bits: weight bit-widths to evaluate (1..8); others are +inf, 32 is 0.
    a_bits: activation bit-widths to evaluate.
    channels: per channel (see above).
  """
  out = {}
  for role, bits in (("weight", w_bits), ("activation", a_bits)):
    bits = [int(b) for b in bits if b != FLOAT_BITS]
    operands = _role_operands(role, variables, recorded, num_batches)
    found = _table(operands, bits, key, channels) if bits and operands else None
    tables = []
    for l, (_, _, parts) in enumerate(operands):
      shape = (len(TABLE_BITS), hutchinson.channel_count(parts.shape[1:])) if channels else (
          len(TABLE_BITS),)
      table = np.full(shape, np.inf)
      table[table_index(FLOAT_BITS)] = 0.0
      if found is not None:
        table[[table_index(b) for b in bits]] = found[l]
      tables.append(table)
    out[role] = tables if channels else np.array(tables).reshape(-1, len(TABLE_BITS))
  return out["weight"], out["activation"]


def _table(operands: list[tuple[Any, Array, Array]], bits: list[int],
           key: PRNGKey, channels: bool = False) -> list[np.ndarray]:
  """Per layer `[K]` (`channels`: `[K, C_l]`) errors of `operands`
  (`_role_operands`) at `bits`."""
  quantizers = tuple(q for q, _, _ in operands)
  try:
    hash(quantizers)
    if all(_TRACEABLE.get(q, True) for q in quantizers):
      return [np.asarray(t, np.float64) for t in _jitted_role_table(
          quantizers, tuple(x for _, x, _ in operands), tuple(p for _, _, p in operands),
          jnp.asarray(bits, jnp.int32), key, channels)]
  except TypeError:  # A quantizer holding arrays cannot be a static argument.
    pass
  except _UNTRACEABLE:
    pass  # `_error` finds which quantizer and remembers it.
  return [np.array([_error(q, x, p, b, _error_key(key, l, b), channels) for b in bits],
                   np.float64) for l, (q, x, p) in enumerate(operands)]


def channel_weighted(tables: Sequence[np.ndarray], traces: Sequence[np.ndarray]
                     ) -> np.ndarray:
  """`[L, 9]`: per layer, the errors `[9, C]` weighted by the channel traces `[C]`,
  `sum_c Tr_c mse_c / sum_c Tr_c` (the plain mean where `sum_c Tr_c <= 0`)."""
  out = []
  for table, trace in zip(tables, traces):
    trace = np.asarray(trace, np.float64)
    total = trace.sum()
    weights = trace / total if total > 0 else np.full_like(trace, 1.0 / trace.size)
    finite = np.all(np.isfinite(table), axis=1)
    out.append(np.where(finite, np.where(finite[:, None], table, 0.0) @ weights, np.inf))
  return np.array(out, np.float64).reshape(-1, len(TABLE_BITS))
