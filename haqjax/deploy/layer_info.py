"""What the integer lowering needs of a quantizable layer's call.

`capture` records one `LayerInfo` per layer call: for a haqjax `QConv` /
`QDense` (`haqjax_layer_info`), and for a flax `nn.Conv` / `nn.Dense` run
inside a `haqjax.nn.quantized` wrapper (`flax_layer_info`), whose kernel,
bias and quantizer parameters sit in the same places (`kernel`, `bias`,
`weight_quant`, `act_quant` under the module's path) and whose name is the
intercepted op's (`haqjax.nn.intercept.module_path`), as in the policy.
An NNX model converted by `haqjax.nn.nnx_quantized` runs each `nnx.Conv` /
`nnx.Linear` inside a linen scope at its attribute path
(`haqjax.nn.nnx_model.NnxCall`): that scope gives the name and the path, the
NNX layer it runs (`called_layer`) the geometry, as a linen layer's own
fields do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from flax import nnx
import flax.linen as nn
import jax

from haqjax.nn.intercept import module_path
from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.nn.layers import layer_name
from haqjax.nn.nnx_model import called_layer
from haqjax.nn.quantized import op_quantizers
from haqjax.typing import Array

# The flax layers a `haqjax.nn.quantized` (or `nnx_quantized`) model deploys,
# by their site kind.
FLAX_LAYERS = ((nn.Conv, "conv"), (nn.Dense, "dense"), (nnx.Conv, "conv"),
               (nnx.Linear, "dense"))
# String paddings of `nn.Conv` that are plain zero padding.
_PADDINGS = ("SAME", "VALID")


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """What the lowering needs of a quantizable layer's call."""
  name: str
  kind: str  # 'conv' or 'dense'
  path: tuple[str, ...]
  quantizers: tuple[Any, Any]  # (weight, act)
  bn: tuple[tuple[str, ...], float] | None  # folded BN (path, epsilon)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  groups: int = 1
  use_bias: bool = False
  in_shape: tuple[int, ...] = ()  # the input's shape, batch axis first


def _check_dense_input(name: str, x: Array) -> None:
  if x.ndim != 2:
    raise ValueError(f"deploy: dense layer {name!r} has a {x.ndim}-d input; allowed: [N, K]")


def _pads(x: Array, kernel_size: Sequence[int], strides: tuple[int, int],
          padding: Any) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel_size, strides, padding)
  elif isinstance(padding, int):
    pads = ((padding, padding),) * 2
  else:
    pads = [(p, p) if isinstance(p, int) else p for p in padding]
  return tuple((int(a), int(b)) for a, b in pads)


def _strides(strides: Any) -> tuple[int, int]:
  if strides is None:
    return (1, 1)
  pair = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  return tuple(int(s) for s in pair)


def haqjax_layer_info(module: QConv | QDense, x: Array, kwargs: dict[str, Any]
                      ) -> LayerInfo:
  """The `LayerInfo` of a `QConv` / `QDense` call on `x`."""
  name = layer_name(module)
  if kwargs.get("train"):
    raise ValueError(f"deploy: layer {name!r} is called with train=True; allowed: eval mode")
  bn = kwargs.get("bn")
  folded = None if bn is None else (tuple(bn.scope.path), float(bn.epsilon))
  common = dict(name=name, path=tuple(module.scope.path), quantizers=module.quantizers(),
                bn=folded, use_bias=bool(module.use_bias), in_shape=tuple(x.shape))
  if isinstance(module, QDense):
    _check_dense_input(name, x)
    return LayerInfo(kind="dense", **common)
  strides = _strides(module.strides)
  return LayerInfo(kind="conv", strides=strides,
                   padding=_pads(x, module.kernel_size, strides, module.padding),
                   groups=int(module.feature_group_count), **common)


def flax_kind(module: nn.Module) -> str | None:
  """'conv' / 'dense' for an `nn.Conv` / `nn.Dense` (or the scope of an
  `nnx.Conv` / `nnx.Linear`), else None."""
  layer = called_layer(module)
  return next((kind for cls, kind in FLAX_LAYERS if isinstance(layer, cls)), None)


def flax_layer_info(module: nn.Module, x: Array, quant_scheme: Any) -> LayerInfo:
  """The `LayerInfo` of an intercepted `nn.Conv` / `nn.Dense` call on `x`.

  Args:
    module: the bound flax layer, or the `NnxCall` scope of an `nnx.Conv` /
      `nnx.Linear`.
    x: its input.
    quant_scheme: the wrapper's quant scheme (`op_quantizers` picks the op's).

  Raises:
    ValueError: geometry the integer `conv` has no form for (not a 2-D NHWC
      convolution, dilation, a mask, non-zero padding modes), naming the layer.
  """
  name = module_path(module)
  kind = flax_kind(module)
  path = tuple(module.scope.path)
  module = called_layer(module)  # An NNX layer's geometry; the scope's name and path.
  common = dict(name=name, kind=kind, path=path,
                quantizers=op_quantizers(quant_scheme, name, kind), bn=None,
                use_bias=bool(module.use_bias), in_shape=tuple(x.shape))
  if kind == "dense":
    _check_dense_input(name, x)
    return LayerInfo(**common)
  kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                 else tuple(module.kernel_size))
  ones = lambda v: v is None or all(int(d) == 1 for d in ((v,) if isinstance(v, int) else v))
  problems = {
      "a non-2-D kernel": len(kernel_size) != 2 or x.ndim != 4,
      f"padding {module.padding!r}": (isinstance(module.padding, str)
                                      and module.padding.upper() not in _PADDINGS),
      "dilation": not (ones(module.input_dilation) and ones(module.kernel_dilation)),
      "a kernel mask": module.mask is not None,
  }
  found = [what for what, bad in problems.items() if bad]
  if found:
    raise ValueError(f"deploy: conv layer {name!r} has {', '.join(found)}; allowed: a 2-D "
                     "NHWC convolution with zero padding, no dilation and no mask")
  strides = _strides(module.strides)
  padding = module.padding.upper() if isinstance(module.padding, str) else module.padding
  return LayerInfo(strides=strides, padding=_pads(x, kernel_size, strides, padding),
                   groups=int(module.feature_group_count), **common)
