"""Quantize a plain `flax.linen` model without editing it, with bits as data.

`quantized(model)` wraps a model the user wrote with flax's own layers
(`nn.Conv`, `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`,
`nn.MultiHeadDotProductAttention`, products in their own modules) into a
module called as the haqjax models are::

    qmodel = haqjax.nn.quantized(model, quant_scheme)
    variables = haqjax.nn.init_quantizers(qmodel, user_variables, x)
    table = haqjax.nn.layer_table(qmodel, x.shape)
    policy = haqjax.Policy.uniform(table.names, w_bits=4, a_bits=4)
    logits = qmodel.apply(variables, x, policy=policy, train=False)

The wrapped model's variables are the user's (`nn.share_scope`: the same
module paths, the same initial values for the same key) plus the
quantizer parameters, which sit in the scope of the module that runs each
op under the names the haqjax layers use (`weight_quant`, `act_quant`), so
`haqjax.nn.calibrate` and the trainer treat both alike. The policy is an
argument of `apply` (a `Policy`, a `SoftPolicy`, or None for floating
point): its bits are traced arrays, so one compilation serves every policy
and `jax.vmap` over a stacked policy runs many.

Which op gets which bits (`haqjax.nn.intercept` names the ops):

* a weighted op (convolution, depthwise convolution, dense, einsum with a
  kernel) quantizes its input to `a_bits` with the activation quantizer and
  its kernel to `w_bits` with the weight quantizer, as a `QConv`/`QDense`;
* a matmul of two activations (attention's `qk` and `pv`, a `jnp.einsum` or
  `jnp.matmul` of activations in the user's module) quantizes its first
  operand to `a_bits` and its second to the layer's `w_bits`, both with the
  activation quantizer (parameters `act_quant` and `rhs_quant` under the
  op's entry, e.g. `params/encoder/attention/qk/act_quant`). The second
  operand takes the place a kernel has in a weighted op: it is the
  stationary operand of the GEMM on an accelerator, and the cost models
  charge `w_bits` to it, so a search trades its width against the others'
  as it does a kernel's.

Quantizers come from `quant_scheme` (`QuantScheme.for_layer` on the op's
name, so `QuantRule` regexes match the user's module paths); without one,
min-max fake-quant, as the haqjax layers.

The haqjax trainer calls `apply(variables, x, policy=..., train=...)`. The
wrapper passes `train` to the model's own mode argument, named by
`train_arg`: by default ('auto') the first of `TRAIN_ARGS` that the model's
`__call__` takes, inverted for `deterministic`, `use_running_average`,
`eval` and `inference`; None passes nothing (the model has no mode).
With `freeze_bn_stats=True` every `nn.BatchNorm` of the model runs on its
running statistics, in training too, and leaves them unchanged (QAT on
frozen statistics; its scale and bias still train).
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import inspect
from typing import Any

import flax.linen as nn
import jax

from haqjax.nn import intercept
from haqjax.nn.layers import DEFAULT_ACT_QUANTIZER
from haqjax.nn.layers import DEFAULT_WEIGHT_QUANTIZER
from haqjax.nn.layers import mix
from haqjax.policy import Policy
from haqjax.policy import SoftPolicy
from haqjax.quant.base import Quantizer
from haqjax.typing import Array, PRNGKey, PyTree

# A model's mode arguments that `train` maps to: name -> inverted.
TRAIN_ARGS = {"train": False, "training": False, "is_training": False,
              "deterministic": True, "use_running_average": True, "eval": True,
              "inference": True}
# Parameter names of a matmul's operands' quantizers (first, second).
MATMUL_ROLES = ("act_quant", "rhs_quant")


def op_quantizers(scheme: Any, name: str, kind: str) -> tuple[Quantizer, Quantizer]:
  """`(second operand's, first operand's)` quantizer of op `name`.

  For a weighted op, `(weight, act)` as a haqjax layer's `quantizers()`; for
  a matmul of two activations, the activation quantizer twice.
  """
  wq, aq = (None, None) if scheme is None else scheme.for_layer(name)
  aq = DEFAULT_ACT_QUANTIZER if aq is None else aq
  if kind == "matmul":
    return aq, aq
  return (DEFAULT_WEIGHT_QUANTIZER if wq is None else wq), aq


def train_argument(model: nn.Module, train_arg: str | None) -> str | None:
  """The name of `model`'s mode argument that the wrapper's `train` sets.

  Raises:
    ValueError: `train_arg` names no argument of `model.__call__`.
  """
  params = inspect.signature(type(model).__call__).parameters
  if train_arg == "auto":
    return next((n for n in TRAIN_ARGS if n in params), None)
  if train_arg is None:
    return None
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  if train_arg not in params and not takes_any:
    allowed = [n for n in params if n != "self"]
    raise ValueError(f"train_arg is {train_arg!r}; {type(model).__name__}.__call__ "
                     f"takes: {', '.join(allowed)}; allowed: one of them, 'auto' or None")
  return train_arg


def check_policy_names(policy_names: tuple[str, ...], layers: list[str]) -> None:
  """One ValueError line naming the policy's layers the model lacks and vice versa."""
  known = set(layers)
  extra = [n for n in policy_names if n not in known]
  missing = [n for n in dict.fromkeys(layers) if n not in set(policy_names)]
  parts = []
  if extra:
    parts.append(f"the model has no layers {', '.join(extra)}")
  if missing:
    parts.append(f"the policy lacks the model's layers {', '.join(missing)}")
  if parts:
    raise ValueError(f"policy does not match the model's quantizable layers: "
                     f"{'; '.join(parts)}")


class Quantized(nn.Module):
  """A plain flax model whose products are quantized by a policy at call time.

  Build it with `quantized(...)`. See the module docstring.

  Attributes:
    model: the user's (unbound) flax module.
    quant_scheme: the quantizers per op (a `haqjax.quant.QuantScheme`);
      None: min-max fake-quant.
    train_arg: the model's argument that `train` sets; 'auto': the first of
      `TRAIN_ARGS` its `__call__` takes; None: `train` is not passed on.
    train_inverted: whether that argument means "not training"; None:
      inferred from its name (`TRAIN_ARGS`).
    freeze_bn_stats: every `flax.linen.BatchNorm` of the model normalizes
      with its running statistics and leaves them as they are, in training
      too (QAT on frozen statistics, as the zoo models' option); its scale
      and bias still train.
  """
  model: nn.Module
  quant_scheme: Any = None
  train_arg: str | None = "auto"
  train_inverted: bool | None = None
  freeze_bn_stats: bool = False

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, *args: Any, policy: Policy | SoftPolicy | None = None,
               train: bool | None = None, **kwargs: Any) -> Any:
    """The model's output with every intercepted op quantized by `policy`.

    Args:
      *args: the model's positional arguments.
      policy: bits per op (a `Policy` or `SoftPolicy` naming every op of
        the layer table), or None for floating point.
      train: training mode, passed to the model's `train_arg`; None: the
        model's default.
      **kwargs: the model's keyword arguments.

    Returns:
      What the model returns.

    Raises:
      ValueError: the policy names ops the model lacks or lacks some of its
        ops, or quantizer parameters are missing from the variables.
    """
    kwargs = mode_kwargs(self, train, kwargs)
    seen: list[str] = []

    def handle(site, lhs, rhs, compute):
      seen.append(site.name)
      return compute(*self._quantize(site, lhs, rhs, policy))

    with frozen_batch_norms(self.freeze_bn_stats), \
        nn.intercept_methods(intercept.interceptor(handle)):
      out = self.model(*args, **kwargs)
    if policy is not None:
      check_policy_names(policy.names, seen)
    return out

  def _quantize(self, site: intercept.Site, lhs: Array, rhs: Array,
                policy: Policy | SoftPolicy | None) -> tuple[Array, Array]:
    """`(lhs, rhs)` quantized for `site` by `policy` (parameters created at init)."""
    rq, aq = op_quantizers(self.quant_scheme, site.name, site.kind)
    if site.kind == "matmul":
      def inits():
        out = {role: q.init(v) for role, q, v in zip(MATMUL_ROLES, (aq, rq), (lhs, rhs))}
        return {k: v for k, v in out.items() if v}
      stored = _variable(site, site.leaf, inits)
      a_params, r_params = (stored.get(role, {}) for role in MATMUL_ROLES)
    else:
      r_params = _variable(site, "weight_quant", lambda: rq.init(rhs))
      a_params = _variable(site, "act_quant", lambda: aq.init(lhs))
    if policy is None or site.name not in policy.names:
      return lhs, rhs  # A policy that lacks the op fails after the forward pass.
    module = site.module
    a_key = module.make_rng("quant") if aq.needs_key else None
    r_key = module.make_rng("quant") if rq.needs_key else None
    if isinstance(policy, SoftPolicy):
      w_bits, w_probs, a_bits, a_probs = policy.candidates_for(site.name)
      return (mix(aq, a_params, lhs, a_bits, a_probs, a_key, policy.per_candidate),
              mix(rq, r_params, rhs, w_bits, w_probs, r_key, policy.per_candidate))
    w_bits, a_bits = policy.bits_for(site.name)
    return aq(a_params, lhs, a_bits, a_key), rq(r_params, rhs, w_bits, r_key)


def _running_average(next_fun, args, kwargs, context):
  """Interceptor: `nn.BatchNorm` calls run with `use_running_average=True`."""
  module = context.module
  if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"):
    return next_fun(*args, **kwargs)
  if module.use_running_average is None:  # Given at call time (or not at all).
    return next_fun(*args[:1], **{**kwargs, "use_running_average": True})
  # Set at construction, as `nn.BatchNorm(use_running_average=not train)`:
  # flax takes it from one place only, so the attribute is set for this call.
  given = module.use_running_average
  object.__setattr__(module, "use_running_average", True)
  try:
    return next_fun(*args, **kwargs)
  finally:
    object.__setattr__(module, "use_running_average", given)


def frozen_batch_norms(frozen: bool):
  """A context in which every `nn.BatchNorm` uses its running statistics (if `frozen`)."""
  return nn.intercept_methods(_running_average) if frozen else contextlib.nullcontext()


def mode_kwargs(model: Quantized, train: bool | None, kwargs: dict[str, Any]
                ) -> dict[str, Any]:
  """`kwargs` with `train` passed to the wrapped model's mode argument.

  Raises:
    ValueError: `train` and the model's own mode argument are both given.
  """
  name = None if train is None else train_argument(model.model, model.train_arg)
  if name is None:
    return dict(kwargs)
  if name in kwargs:
    raise ValueError(f"train={train} and {name}={kwargs[name]!r} are both given; "
                     f"allowed: one of them")
  inverted = (TRAIN_ARGS.get(name, False) if model.train_inverted is None
              else model.train_inverted)
  return {**kwargs, name: (not train) if inverted else train}


def apply_float(model: Quantized, variables: PyTree, handle: intercept.Handler,
                *args: Any, train: bool | None = None, **kwargs: Any) -> Any:
  """The wrapped model run in floating point, each intercepted op by `handle`.

  `handle(site, lhs, rhs, compute)` returns the op's output, e.g.
  `compute(lhs + e, rhs)` to perturb its input (HAWQ's input Hessians); no
  quantizer runs and the quantizer parameters in `variables` are ignored.

  Args:
    model: the quantized model.
    variables: its variables (the user's, with or without quantizer ones).
    handle: the computation of each intercepted op.
    *args: the model's positional arguments.
    train: training mode, passed to the model's `train_arg`.
    **kwargs: the model's keyword arguments.

  Returns:
    What the model returns.
  """
  kwargs = mode_kwargs(model, train, kwargs)
  with frozen_batch_norms(model.freeze_bn_stats), \
      nn.intercept_methods(intercept.interceptor(handle)):
    return model.model.apply(variables, *args, **kwargs)


def _variable(site: intercept.Site, name: str, make: Callable[[], PyTree]) -> PyTree:
  """The quantizer parameters `name` in the site's module scope, `make()` at init.

  Empty parameters (`{}` of a quantizer that has none) are not stored. Once
  they exist, `make` is not called: the quantizer's `init` (a range
  computation) would be dead code whose JVP every differentiated forward
  pass traced and compiled.
  """
  scope = site.module.scope
  if scope.has_variable("params", name):
    return scope.get_variable("params", name)
  value = make()
  if not value:
    return {}
  if not scope.is_mutable_collection("params"):
    where = "/".join(tuple(scope.path) + (name,))
    raise ValueError(f"the variables have no quantizer parameters {where!r}; allowed: "
                     "the quantized model's own init, or the user's variables passed "
                     "through haqjax.nn.init_quantizers")
  return scope.param(name, lambda _: value)


def quantized(model: nn.Module, quant_scheme: Any = None, *,
              train_arg: str | None = "auto",
              train_inverted: bool | None = None,
              freeze_bn_stats: bool = False) -> Quantized:
  """`model` made quantizable by a policy at call time; see the module docstring.

  Args:
    model: an unbound flax linen module, written with flax's layers.
    quant_scheme: a `haqjax.quant.QuantScheme` (quantizer per role and per op
      name); None: min-max fake-quant.
    train_arg: the model's mode argument that the wrapper's `train` sets:
      'auto' (the first of `TRAIN_ARGS` that `model.__call__` takes), a name,
      or None (the model has none).
    train_inverted: whether `train_arg` means "not training"; None: from its
      name (`deterministic`, `use_running_average`, `eval`, `inference`).
    freeze_bn_stats: the model's `nn.BatchNorm`s use and keep their running
      statistics in training too (`Quantized.freeze_bn_stats`).

  Returns:
    The `Quantized` module, called as `apply(variables, *args, policy=...,
    train=..., **kwargs)`.

  Raises:
    ValueError: `model` is not a flax module, is already quantized, or
      `train_arg` names no argument of its `__call__`.
  """
  if not isinstance(model, nn.Module) or isinstance(model, Quantized):
    raise ValueError(f"model is a {type(model).__name__}; allowed: a flax.linen "
                     "Module that is not already quantized")
  train_argument(model, train_arg)
  if not isinstance(freeze_bn_stats, bool):
    raise ValueError(f"freeze_bn_stats is {freeze_bn_stats!r}; allowed: True or False")
  return Quantized(model, quant_scheme, train_arg, train_inverted, freeze_bn_stats)


def init_quantizers(model: Quantized, variables: PyTree, *args: Any,
                    key: PRNGKey | None = None, **kwargs: Any) -> PyTree:
  """The user's `variables` plus the quantizer parameters `model` adds.

  Runs `model` once in floating point (eval mode) on `args`, creating only
  what `variables` lack; the user's arrays are kept as they are.

  Args:
    model: the quantized model.
    variables: the user's model's variables (`params`, `batch_stats`, ...).
    *args: example inputs (only shapes matter to the quantizers' init).
    key: PRNG key for parameter creation (quantizers ignore it); default 0.
    **kwargs: the model's other keyword arguments.

  Returns:
    `{**variables, "params": params with quantizer parameters}`.
  """
  key = jax.random.key(0) if key is None else key
  kwargs.setdefault("train", False)
  _, new = model.apply(variables, *args, mutable=["params"], rngs={"params": key},
                       **kwargs)
  return {**variables, "params": new["params"]}
