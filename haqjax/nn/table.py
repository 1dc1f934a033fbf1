"""The layer table of a model, derived by tracing the model itself.

`layer_table(model, input_shape)` runs the model abstractly (no FLOPs, no
parameters allocated) and records every haqjax layer it calls, in forward
order. The hardware cost model, the search agents, policies and reports all
read this table, so a model built from haqjax layers needs no hand-written
metadata.

A plain flax model wrapped by `haqjax.nn.quantized` is traced the same way:
its table lists every intercepted op (`haqjax.nn.intercept`) in forward
order, convolutions, depthwise convolutions and dense layers as the haqjax
layers would, and each matmul of two activations (kind 'matmul': a GEMM of
`groups` independent `[in_h, in_channels / groups] x [in_channels / groups,
out_channels / groups]` products, no parameters). Every other product of
the traced program (`x @ y`, `nn.ConvTranspose`) runs in floating point: it
is listed in `float_ops` (and by `format()`), with one warning line naming
them, never dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from haqjax.nn import dataflow
from haqjax.nn import intercept
from haqjax.nn.dataflow import FloatOp
from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.nn.layers import layer_name
from haqjax.nn.quantized import Quantized

KINDS = ("conv", "depthwise", "dense", "matmul")

# Integer columns of the table, in order.
COLUMNS = ("in_channels", "out_channels", "kernel_h", "kernel_w", "stride",
           "groups", "in_h", "in_w", "out_h", "out_w", "macs", "params")


@dataclasses.dataclass(frozen=True)
class LayerTable:
  """Per-layer description, one entry per quantizable layer, forward order.

  Sizes are for one example (batch 1): `macs` counts multiply-accumulates of
  one forward pass; `params` counts weights plus bias. A dense layer has a
  1x1 kernel and a 1x1 feature map (or its token count as `in_h`). A matmul
  of two activations is `groups` GEMMs of `[in_h, in_channels / groups] x
  [in_channels / groups, out_channels / groups]` with no weights (`params`
  and `weight_count` 0).

  Attributes:
    names: layer names (module paths), as the policy uses them.
    kinds: 'conv', 'depthwise', 'dense' or 'matmul' per layer.
    in_channels ... params: int64 arrays `[L]` (see COLUMNS).
    float_ops: the products the model runs in floating point, not in the
      table (`haqjax.nn.dataflow.FloatOp`).
  """
  names: tuple[str, ...]
  kinds: tuple[str, ...]
  in_channels: np.ndarray
  out_channels: np.ndarray
  kernel_h: np.ndarray
  kernel_w: np.ndarray
  stride: np.ndarray
  groups: np.ndarray
  in_h: np.ndarray
  in_w: np.ndarray
  out_h: np.ndarray
  out_w: np.ndarray
  macs: np.ndarray
  params: np.ndarray
  float_ops: tuple[FloatOp, ...] = ()

  def __len__(self) -> int:
    return len(self.names)

  @property
  def is_depthwise(self) -> np.ndarray:
    return np.array([k == "depthwise" for k in self.kinds])

  @property
  def is_matmul(self) -> np.ndarray:
    """Whether each layer is a matmul of two activations (no weights)."""
    return np.array([k == "matmul" for k in self.kinds], bool)

  @property
  def weight_count(self) -> np.ndarray:
    """Kernel elements per layer (the quantized weights; no bias; 0 for a matmul)."""
    count = (self.kernel_h * self.kernel_w * self.in_channels // self.groups
             * self.out_channels)
    return np.where(self.is_matmul, 0, count)

  def rows(self) -> list[dict[str, Any]]:
    """One plain dict per layer (JSON-ready)."""
    return [{"name": n, "kind": k, **{c: int(getattr(self, c)[i]) for c in COLUMNS}}
            for i, (n, k) in enumerate(zip(self.names, self.kinds))]

  def format(self) -> str:
    """A fixed-width text rendering for logs and reports."""
    head = f"{'#':>3} {'name':<28} {'kind':<9} {'in':>5} {'out':>5} {'k':>3} " \
           f"{'s':>2} {'map':>9} {'MACs':>12} {'params':>10}"
    lines = [head]
    for i, r in enumerate(self.rows()):
      lines.append(
          f"{i:>3} {r['name'][-28:]:<28} {r['kind']:<9} {r['in_channels']:>5} "
          f"{r['out_channels']:>5} {r['kernel_h']:>3} {r['stride']:>2} "
          f"{str(r['in_h']) + 'x' + str(r['in_w']):>9} {r['macs']:>12,} {r['params']:>10,}")
    lines.append(f"total: {len(self)} layers, {int(self.macs.sum()):,} MACs, "
                 f"{int(self.params.sum()):,} params")
    for op in self.float_ops:
      lines.append(f"float {op.name[-28:]:<28} {op.primitive:<9} {'':>31} {op.macs:>12,} "
                   "(left in floating point)")
    return "\n".join(lines)


def _record(module: nn.Module, x_shape: Sequence[int],
            y_shape: Sequence[int]) -> dict[str, Any]:
  if isinstance(module, QConv):
    _, h, w, cin = x_shape
    _, ho, wo, cout = y_shape
    kh, kw = module.kernel_size
    s = module.strides if isinstance(module.strides, int) else module.strides[0]
    g = module.feature_group_count
    kind = "depthwise" if g > 1 and g == cin else "conv"
    weights = kh * kw * (cin // g) * cout
    macs = ho * wo * weights
  else:
    cin, cout = x_shape[-1], y_shape[-1]
    tokens = int(np.prod(x_shape[1:-1])) if len(x_shape) > 2 else 1
    h, w, ho, wo, kh, kw, s, g = tokens, 1, tokens, 1, 1, 1, 1, 1
    kind = "dense"
    weights = cin * cout
    macs = tokens * weights
  params = weights + (cout if module.use_bias else 0)
  return dict(name=layer_name(module), kind=kind, in_channels=cin,
              out_channels=cout, kernel_h=kh, kernel_w=kw, stride=s, groups=g,
              in_h=h, in_w=w, out_h=ho, out_w=wo, macs=macs, params=params)


def layer_table(model: nn.Module, input_shape: Sequence[int],
                **call_kwargs: Any) -> LayerTable:
  """Traces `model` on an input of `input_shape` and lists its haqjax layers.

  Args:
    model: a flax module built from `QConv`/`QDense`, or a plain flax model
      wrapped by `haqjax.nn.quantized`.
    input_shape: NHWC shape; the batch entry is ignored (sizes are per example).
    **call_kwargs: extra arguments of the model's `__call__` (e.g. train=False).

  Returns:
    The model's `LayerTable`.

  Raises:
    ValueError: if the model has no haqjax layer (no intercepted op), or
      calls one layer twice.
  """
  if isinstance(model, Quantized):
    return _quantized_table(model, input_shape, **call_kwargs)
  records: list[dict[str, Any]] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (context.method_name == "__call__"
        and isinstance(context.module, (QConv, QDense))):
      records.append(_record(context.module, args[0].shape, out.shape))
    return out

  shape = (1, *tuple(input_shape)[1:])
  x = jax.ShapeDtypeStruct(shape, jnp.float32)

  def init(x):
    with nn.intercept_methods(interceptor):
      return model.init(jax.random.key(0), x, **call_kwargs)

  jax.eval_shape(init, x)
  if not records:
    raise ValueError(f"model {type(model).__name__} has no haqjax layer "
                     "(QConv/QDense) to quantize; a model of flax layers is "
                     "quantized through haqjax.nn.quantized(model)")
  return _table(records)


def _table(records: list[dict[str, Any]],
           float_ops: tuple[FloatOp, ...] = ()) -> LayerTable:
  names = [r["name"] for r in records]
  if len(set(names)) != len(names):
    dup = next(n for n in names if names.count(n) > 1)
    raise ValueError(f"layer {dup!r} is called more than once per forward pass; "
                     "give each call its own module so it gets its own bits")
  return LayerTable(
      names=tuple(names), kinds=tuple(r["kind"] for r in records),
      float_ops=tuple(float_ops),
      **{c: np.array([r[c] for r in records], dtype=np.int64) for c in COLUMNS})


def _quantized_table(model: Quantized, input_shape: Sequence[int],
                     **call_kwargs: Any) -> LayerTable:
  """The table of a `haqjax.nn.quantized` model: its intercepted ops and float ops."""
  call_kwargs.setdefault("train", False)
  x = jax.ShapeDtypeStruct((1, *tuple(input_shape)[1:]), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, **call_kwargs), x)
  with intercept.recording(mark=True) as calls:
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, **call_kwargs))(variables, x)
  floats = dataflow.float_ops(closed)
  if floats:
    logging.warning("left in floating point (not quantized, not in the layer table): %s",
                    ", ".join(f"{op.name} ({op.primitive})" for op in floats))
  if not calls:
    raise ValueError(f"model {type(model.model).__name__} has no op to quantize "
                     "(nn.Conv, nn.Dense, nn.DenseGeneral, nn.Einsum, attention or "
                     "a product of two activations)")
  return _table([c.row for c in calls], floats)
