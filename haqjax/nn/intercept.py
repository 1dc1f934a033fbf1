"""Interception of the quantizable operations of a plain `flax.linen` model.

A model written with flax's own layers runs unchanged while a
`flax.linen.intercept_methods` interceptor (`interceptor(handle)`) swaps, for
the duration of each module call, the few JAX functions that compute its
products: `jax.lax.conv_general_dilated` inside `nn.Conv` (any
`feature_group_count`, so depthwise too), `jax.lax.dot_general` inside
`nn.Dense` and `nn.DenseGeneral`, `jax.numpy.einsum` inside `nn.Einsum`, and
`jnp.einsum`, `jnp.matmul`, `jnp.dot` and `jax.lax.dot_general` inside
`nn.MultiHeadDotProductAttention` and inside the user's own modules (those
not defined by flax or by haqjax's layers). Each swapped call hands its two
operands to `handle(site, lhs, rhs, compute)`, which may quantize them and
then runs flax's own computation, `compute(lhs, rhs)`: padding modes,
dilations, dimension numbers and dtype promotion stay flax's (the approach of
qwix's interception). Inside every other module (`nn.LayerNorm`,
`nn.ConvTranspose`, `nn.Embed`, haqjax's `QConv`, ...) the original
functions are restored, so their products are not taken for the enclosing
module's.

An operation is a `Site`:

* a weighted op, `nn.Conv` / `nn.Dense` / `nn.DenseGeneral` / `nn.Einsum`:
  `lhs` is the input activation and `rhs` the kernel; its name is the
  module path (`layer1_0/conv1`), as a haqjax layer's;
* a matmul of two activations (`kind == 'matmul'`), in attention or the
  user's code: both operands are activations; its name is
  `<module path>/<function>_<i>`, the `i`-th call of that function
  (`einsum`, `matmul`, `dot`, `dot_general`) in that module during one
  forward pass, e.g. `block0/einsum_0`. In `nn.MultiHeadDotProductAttention`
  with flax's `dot_product_attention`, the two einsums are named `qk`
  (queries x keys) and `pv` (attention weights x values):
  `encoder/attention/qk`.

A call whose operands are not two floating-point arrays (an einsum of three
operands, an integer product) runs unchanged and is not a site; it stays in
the traced computation as an unquantized product, which
`haqjax.nn.dataflow.float_ops` lists.

`recording()` collects every site called while it is active as an `OpCall`
(its operands, output and layer-table row): what `haqjax.nn.layer_table`
and `haqjax.nn.calibrate` read. With `mark=True` each site's computation runs
as a `jax.jit` call named `MARKER<i>`, so a walk over the traced jaxpr tells
intercepted products from the rest.

The swap is a process-wide attribute assignment, undone when the module call
returns: trace interception-wrapped models from one thread at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum

from haqjax.nn.layers import FoldedBatchNorm
from haqjax.nn.layers import QuantizedLayer
from haqjax.typing import Array

MARKER = "haqjax_op_"
# The functions that can be swapped: name -> (module, attribute).
TARGETS = {
    "conv_general_dilated": (jax.lax, "conv_general_dilated"),
    "dot_general": (jax.lax, "dot_general"),
    "einsum": (jnp, "einsum"),
    "matmul": (jnp, "matmul"),
    "dot": (jnp, "dot"),
}
_ORIGINAL = {fn: getattr(mod, attr) for fn, (mod, attr) in TARGETS.items()}
MATMULS = ("dot_general", "einsum", "matmul", "dot")
# flax's attention einsums, by call order: queries x keys, weights x values.
ATTENTION_OPS = ("qk", "pv")
_STATE = threading.local()


class Site(NamedTuple):
  """One intercepted operation call.

  Attributes:
    name: its name in the layer table and the policy.
    kind: 'conv' or 'dense' (weighted), or 'matmul' (two activations).
    module: the module whose call runs it (bound); its quantizer parameters
      live in this module's scope.
    leaf: for a matmul, the name of its parameter entry in `module`
      (`einsum_0`, `qk`); None for a weighted op.
    fn: the intercepted function's name (a key of `TARGETS`).
  """
  name: str
  kind: str
  module: nn.Module
  leaf: str | None
  fn: str

  @property
  def path(self) -> tuple[str, ...]:
    """Where the op's quantizer parameters are in `params`."""
    path = tuple(self.module.scope.path)
    return path if self.leaf is None else path + (self.leaf,)


@dataclasses.dataclass(frozen=True)
class OpCall:
  """A recorded site call.

  Attributes:
    site: the site.
    lhs, rhs: its operands as they reached it (before quantization).
    out: its output.
    row: its layer-table row (`haqjax.nn.table.COLUMNS`, with `name` and
      `kind`), per example when the batch is 1.
  """
  site: Site
  lhs: Array
  rhs: Array
  out: Array
  row: dict[str, Any]


@dataclasses.dataclass
class _Recorder:
  mark: bool
  calls: list[OpCall] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def recording(mark: bool = False) -> Iterator[list[OpCall]]:
  """Collects the `OpCall`s of the sites called in this context, in call order.

  Args:
    mark: run each site's computation as a `jax.jit` call named
      `MARKER<i>` (for a jaxpr walk; the values are unchanged).
  """
  stack = _recorders()
  recorder = _Recorder(mark)
  stack.append(recorder)
  try:
    yield recorder.calls
  finally:
    stack.remove(recorder)


def _recorders() -> list[_Recorder]:
  if not hasattr(_STATE, "recorders"):
    _STATE.recorders = []
  return _STATE.recorders


def module_path(module: nn.Module) -> str:
  """A module's path joined by '/', or its class name at the root."""
  return "/".join(module.scope.path) or type(module).__name__


def swapped_functions(module: nn.Module) -> tuple[tuple[str, ...], str | None]:
  """`(functions swapped inside a call of module, site kind)`.

  A module that runs another framework's layer (`haqjax.nn.nnx_model`)
  says it itself: its `intercepted_as` is `(functions, kind, matmul names)`.
  """
  delegated = getattr(module, "intercepted_as", None)
  if delegated is not None:
    return tuple(delegated[0]), delegated[1]
  if isinstance(module, nn.Conv):
    return ("conv_general_dilated",), "conv"
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return ("dot_general",), "dense"
  if isinstance(module, nn.Einsum):
    return ("einsum",), "dense"
  if isinstance(module, nn.MultiHeadDotProductAttention):
    return MATMULS, "matmul"
  if (isinstance(module, (QuantizedLayer, FoldedBatchNorm))
      or type(module).__module__.startswith("flax.")):
    return (), None
  return MATMULS, "matmul"


Handler = Callable[[Site, Array, Array, Callable[[Array, Array], Array]], Array]


def interceptor(handle: Handler) -> Callable[..., Any]:
  """A `flax.linen.intercept_methods` interceptor that routes sites to `handle`.

  `handle(site, lhs, rhs, compute)` returns the op's output; `compute(lhs,
  rhs)` is flax's own computation on (possibly quantized) operands. Matmul
  counters start from 0 for each interceptor: make one per forward pass.

  Example::

      def handle(site, lhs, rhs, compute):
        return compute(quantize(lhs), quantize(rhs))
      with nn.intercept_methods(interceptor(handle)):
        y = model.apply(variables, x)
  """
  counters: dict[tuple[tuple[str, ...], str], int] = {}

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    fns, kind = swapped_functions(module)
    swaps = {fn: _swapped(fn, module, kind, handle, counters) for fn in fns}
    with _swap(swaps):
      return next_fun(*args, **kwargs)

  return intercept


@contextlib.contextmanager
def _swap(swaps: dict[str, Callable[..., Any]]) -> Iterator[None]:
  """Sets every target to its swap or its original; restores them after."""
  before = {fn: getattr(mod, attr) for fn, (mod, attr) in TARGETS.items()}
  for fn, (mod, attr) in TARGETS.items():
    setattr(mod, attr, swaps.get(fn, _ORIGINAL[fn]))
  try:
    yield
  finally:
    for fn, (mod, attr) in TARGETS.items():
      setattr(mod, attr, before[fn])


def _operands(fn: str, args: tuple[Any, ...], kwargs: dict[str, Any]):
  """`(lhs, rhs, call)`, `call(a, b)` the original on new operands; or None."""
  original = _ORIGINAL[fn]
  if fn == "einsum":
    if len(args) != 3 or not isinstance(args[0], str) or "," not in args[0]:
      return None
    lhs, rhs = args[1], args[2]
    call = lambda a, b: original(args[0], a, b, **kwargs)
  else:
    try:
      bound = inspect.signature(original).bind(*args, **kwargs)
    except TypeError:
      return None
    names = list(bound.signature.parameters)[:2]
    lhs, rhs = (bound.arguments.get(n) for n in names)

    def call(a, b):
      new = dict(bound.arguments)
      new[names[0]], new[names[1]] = a, b
      again = inspect.BoundArguments(bound.signature, new)
      return original(*again.args, **again.kwargs)
  floating = all(hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating)
                 and getattr(v, "ndim", 0) >= 1 for v in (lhs, rhs))
  return (lhs, rhs, call) if floating else None


def _swapped(fn: str, module: nn.Module, kind: str, handle: Handler,
             counters: dict[tuple[tuple[str, ...], str], int]) -> Callable[..., Any]:
  """The stand-in for `fn` during a call of `module`."""
  original = _ORIGINAL[fn]

  def op(*args, **kwargs):
    if getattr(_STATE, "inside", False):  # Inside a site: quantizers, flax's own calls.
      return original(*args, **kwargs)
    found = _operands(fn, args, kwargs)
    if found is None:
      return original(*args, **kwargs)
    lhs, rhs, compute = found
    site = _site(module, kind, fn, counters)
    recorders = _recorders()
    if recorders and recorders[-1].mark:
      compute = _marked(compute, f"{MARKER}{len(recorders[-1].calls)}")
    previous = getattr(_STATE, "inside", False)
    _STATE.inside = True
    try:
      out = handle(site, lhs, rhs, compute)
    finally:
      _STATE.inside = previous
    if recorders:
      row = table_row(site, fn, args, kwargs, lhs, rhs, out)
      recorders[-1].calls.append(OpCall(site, lhs, rhs, out, row))
    return out

  return op


def _site(module: nn.Module, kind: str, fn: str,
          counters: dict[tuple[tuple[str, ...], str], int]) -> Site:
  if kind != "matmul":
    return Site(module_path(module), kind, module, None, fn)
  path = tuple(module.scope.path)
  i = counters.get((path, fn), 0)
  counters[path, fn] = i + 1
  leaf = f"{fn}_{i}"
  delegated = getattr(module, "intercepted_as", None)
  names = () if delegated is None else tuple(delegated[2])
  if (isinstance(module, nn.MultiHeadDotProductAttention)
      and module.attention_fn is nn.dot_product_attention):
    names = ATTENTION_OPS
  if fn == "einsum" and i < len(names):
    leaf = names[i]
  return Site("/".join(path + (leaf,)), kind, module, leaf, fn)


def _marked(compute: Callable[[Array, Array], Array], tag: str) -> Callable[..., Array]:
  def mark(a, b):
    return compute(a, b)
  mark.__name__ = tag
  return jax.jit(mark)


def gemm_dims(fn: str, args: tuple[Any, ...], kwargs: dict[str, Any], lhs: Array,
              rhs: Array) -> tuple[int, int, int, int]:
  """`(G, M, K, N)` of a product: `G` independent `[M, K] x [K, N]` GEMMs.

  `M` counts the `lhs` rows (its free dimensions), `N` the `rhs` columns,
  `K` the contracted length and `G` the shared batch dimensions.
  """
  if fn == "dot_general":
    bound = inspect.signature(_ORIGINAL[fn]).bind(*args, **kwargs)
    (lc, _), (lb, _) = bound.arguments["dimension_numbers"]
    g = int(np.prod([lhs.shape[i] for i in lb]))
    k = int(np.prod([lhs.shape[i] for i in lc]))
    return g, lhs.size // (g * k), k, rhs.size // (g * k)
  if fn == "einsum":
    a, b, out = _einsum_subscripts(args[0], lhs, rhs)
    size = dict(zip(a, lhs.shape)) | dict(zip(b, rhs.shape))
    prod = lambda letters: int(np.prod([size[c] for c in letters]))
    both = set(a) & set(b)
    return (prod(both & set(out)), prod((set(a) - set(b)) & set(out)),
            prod(both - set(out)), prod((set(b) - set(a)) & set(out)))
  k = lhs.shape[-1]
  if fn == "matmul" and lhs.ndim > 1 and rhs.ndim > 1:
    g = int(np.prod(np.broadcast_shapes(lhs.shape[:-2], rhs.shape[:-2])))
    return g, lhs.shape[-2], k, rhs.shape[-1]
  return 1, lhs.size // k, k, rhs.size // k


def _einsum_subscripts(spec: str, lhs: Array, rhs: Array) -> tuple[str, str, str]:
  """`(lhs letters, rhs letters, output letters)` with any ellipsis spelled out."""
  inputs, out, _ = opt_einsum.parser.parse_einsum_input((spec, lhs, rhs))
  a, b = inputs.split(",")
  return a, b, out


def _conv_row(args: tuple[Any, ...], kwargs: dict[str, Any], lhs: Array, rhs: Array,
              out: Array) -> dict[str, int]:
  bound = inspect.signature(_ORIGINAL["conv_general_dilated"]).bind(*args, **kwargs)
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                      bound.arguments.get("dimension_numbers"))
  groups = int(bound.arguments.get("feature_group_count", 1))
  cin, cout = lhs.shape[dn.lhs_spec[1]], rhs.shape[dn.rhs_spec[0]]
  spatial = lambda shape, spec: [int(shape[d]) for d in spec[2:]] + [1]
  sin, sk, sout = (spatial(lhs.shape, dn.lhs_spec), spatial(rhs.shape, dn.rhs_spec),
                   spatial(out.shape, dn.out_spec))
  ho, wo = sout[0], int(np.prod(sout[1:]))
  kh, kw = sk[0], int(np.prod(sk[1:]))
  weights = kh * kw * (cin // groups) * cout
  return dict(in_channels=cin, out_channels=cout, kernel_h=kh, kernel_w=kw,
              stride=int(tuple(bound.arguments["window_strides"])[0]), groups=groups,
              in_h=sin[0], in_w=int(np.prod(sin[1:])), out_h=ho, out_w=wo,
              macs=ho * wo * weights, params=weights)


def table_row(site: Site, fn: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              lhs: Array, rhs: Array, out: Array) -> dict[str, Any]:
  """The layer-table row of a site call (sizes per example at batch 1).

  A convolution reads as a `QConv` (depthwise when each group has one input
  channel and there are several); a weighted product as a `QDense` over its
  `M` rows (`in_h`); a matmul of two activations as a GEMM with `G` groups,
  `in_channels = G * K`, `out_channels = G * N`, `M` rows and no parameters.
  """
  if site.kind == "conv":
    row = _conv_row(args, kwargs, lhs, rhs, out)
    cin, g = row["in_channels"], row["groups"]
    kind = "depthwise" if g > 1 and g == cin else "conv"
  else:
    g, m, k, n = gemm_dims(fn, args, kwargs, lhs, rhs)
    row = dict(in_channels=g * k, out_channels=g * n, kernel_h=1, kernel_w=1, stride=1,
               groups=g, in_h=m, in_w=1, out_h=m, out_w=1, macs=g * m * k * n,
               params=0 if site.kind == "matmul" else int(rhs.size))
    kind = site.kind
  if site.kind != "matmul":
    scope = site.module.scope
    if scope.has_variable("params", "bias"):
      row["params"] += int(np.size(scope.get_variable("params", "bias")))
  return dict(name=site.name, kind=kind, **{k: int(v) for k, v in row.items()})
