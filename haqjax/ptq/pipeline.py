"""The post-training quantization flow, one switch per step.

`ptq(key, model, variables, batches, policy, options)` takes a trained
floating-point model and a few calibration batches and returns a quantized
model (the same architecture with fixed-range quantizers) and its variables,
following the standard order (Nagel et al. 2021, section 4; Qualcomm AIMET):

1. BatchNorm folding into the preceding layer (`folding`);
2. cross-layer equalization and high-bias absorption (`equalization`);
3. quantizers added: `StaticRange` per output channel for weights, per tensor
   for activations (unsigned after ReLU), bits from any per-layer policy;
4. weight range setting (min-max or MSE);
5. AdaRound (`adaround`), which then fixes the weight grids;
6. bias correction, empirical or analytic (`bias_correction`), for nearest
   rounding; AdaRound already reconstructs each layer's output, and the
   rounded kernels are its grid, so it is not applied after AdaRound (as in
   AIMET's recommended flow);
7. activation range setting (min-max, EMA, percentile, MSE or KL) on the
   floating-point activations of the calibration batches.

A plain `flax.linen` model, or a flax NNX one, goes through the same flow
(`haqjax.ptq.wrapped`): its BNs fold into the layers the traced computation
pairs them with, its equalization pairs are the layers the traced
computation joins by only a BN, ReLU/ReLU6 or per-channel pooling
(`wrapped.equalization_pairs`), AdaRound and bias correction take its
`nn.Conv` and `nn.Dense` ops (`nnx.Conv`, `nnx.Linear`), and its other ops
(attention's matmuls of two activations among them) are calibrated only.

Each step's wall time is reported, so the flow doubles as a fast accuracy
signal inside a search.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from haqjax.nn.calibrate import calibrate
from haqjax.nn.calibrate import record_layer_inputs
from haqjax.nn.nnx_model import nnx_quantized
from haqjax.nn.nnx_model import nnx_variables
from haqjax.nn.quantized import Quantized
from haqjax.nn.quantized import quantized
from haqjax.policy import Policy
from haqjax.ptq import adaround as adaround_lib
from haqjax.ptq import bias_correction as bc_lib
from haqjax.ptq import equalization as eq_lib
from haqjax.ptq import folding
from haqjax.ptq import wrapped
from haqjax.quant import calibration
from haqjax.quant.affine import AffineSpec
from haqjax.quant.rules import QuantScheme
from haqjax.quant.uniform import StaticRange
from haqjax.typing import Array, PRNGKey, PyTree

WEIGHT_RANGES = ("minmax", "mse")
BIAS_CORRECTIONS = ("none", "empirical", "analytic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQOptions:
  """Which steps run, and how.

  Attributes:
    fold_bn: fold BatchNorm into the preceding conv/dense.
    cle: cross-layer equalization (needs `fold_bn`).
    relu6: 'skip' (ReLU6 pairs are not equalized) or 'relu' (as DFQ: ReLU6
      is replaced by ReLU in the quantized model, for models with a
      `clip_relu` switch such as MobileNetV2, and the pairs are equalized
      exactly; this changes the floating-point function slightly).
    high_bias_absorption: absorb high biases into the next layer (with `cle`).
    weight_range: 'minmax' or 'mse' per-channel weight ranges.
    adaround: learned rounding of the weights.
    adaround_iters: AdaRound iterations per layer.
    adaround_sequential: each layer's AdaRound input comes from the network
      with the preceding layers already rounded (the paper's asymmetric
      reconstruction; it corrects accumulated error, which deep networks
      need: W4A8 MobileNetV2 on Fashion-MNIST 74.5% vs 34.1% without); else
      the floating-point input.
    bias_correction: 'none', 'empirical' or 'analytic' (nearest rounding only).
    act_range: activation range method, one of
      `haqjax.quant.calibration.METHODS`.
  """
  fold_bn: bool = True
  cle: bool = True
  relu6: str = "skip"
  high_bias_absorption: bool = True
  weight_range: str = "mse"
  adaround: bool = True
  adaround_iters: int = adaround_lib.DEFAULT_ITERS
  adaround_sequential: bool = True
  bias_correction: str = "empirical"
  act_range: str = "mse"

  def __post_init__(self):
    def choice(field, allowed):
      value = getattr(self, field)
      if value not in allowed:
        raise ValueError(f"{field} is {value!r}; allowed: {', '.join(allowed)}")
    choice("relu6", eq_lib.RELU6_MODES)
    choice("weight_range", WEIGHT_RANGES)
    choice("bias_correction", BIAS_CORRECTIONS)
    choice("act_range", calibration.METHODS)
    if self.cle and not self.fold_bn:
      raise ValueError("cle is True with fold_bn False; allowed: cle only on folded "
                       "BatchNorms (set fold_bn)")
    if not isinstance(self.adaround_iters, int) or self.adaround_iters < 1:
      raise ValueError(f"adaround_iters is {self.adaround_iters!r}; allowed: a positive "
                       "integer")


class PTQResult(NamedTuple):
  """The quantized model, its variables and a report of each step."""
  model: nn.Module
  variables: PyTree
  report: dict[str, Any]


def quantized_model(model: nn.Module, options: PTQOptions) -> nn.Module:
  """`model` with fixed-range weight and activation quantizers."""
  weight = StaticRange(spec=AffineSpec(channel_axis=-1), sign="signed",
                       method=options.weight_range, estimator="plain")
  act = StaticRange(method=options.act_range)
  return model.clone(quant_scheme=QuantScheme(weight=weight, act=act))


def _with_quant_params(qmodel: nn.Module, variables: PyTree, image: Array) -> PyTree:
  """`variables` plus freshly initialised quantizer parameters."""
  init = qmodel.init(jax.random.key(0), jnp.zeros((1, *image.shape[1:]), image.dtype),
                     train=False)
  params = folding.copy_tree(init["params"])

  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, dict) or hasattr(v, "items"):
        merge(dst.setdefault(k, {}), v)
      else:
        dst[k] = v

  merge(params, variables["params"])
  return {**variables, "params": params}


def _check_batches(batches: Sequence[Any]) -> list[Any]:
  batches = list(batches)
  if not batches:
    raise ValueError("calibration batches are empty; allowed: at least one batch")
  for batch in batches:
    images = batch["image"] if isinstance(batch, dict) else batch
    if not np.all(np.isfinite(np.asarray(images))):
      raise ValueError("calibration images have non-finite values (NaN or Inf); "
                       "allowed: finite values only")
  return batches


class Prepared(NamedTuple):
  """The policy-independent part of PTQ: folded, equalized, quantizers added.

  `bn_pairs` holds a plain flax model's traced layer -> BN pairs (None: a
  haqjax-layer model's, found by name).
  """
  model: nn.Module
  variables: PyTree
  bn_stats: Any
  pairs: tuple[Any, ...]
  batches: list[Any]
  recorded: dict[str, dict[str, Any]]
  report: dict[str, Any]
  bn_pairs: tuple[folding.BNPair, ...] | None = None


def as_quantizable(model: nn.Module | nnx.Module) -> nn.Module:
  """`model`, wrapped by `haqjax.nn.quantized` if it does not take `policy=`
  (an NNX model by `haqjax.nn.nnx_quantized`)."""
  if isinstance(model, nnx.Module):
    return nnx_quantized(model)
  if isinstance(model, Quantized) or "policy" in inspect.signature(
      type(model).__call__).parameters:
    return model
  return quantized(model)


def _with_stats(pairs: tuple[Any, ...], bn_stats: Any, bn_pairs: Any) -> tuple[Any, ...]:
  """A plain model's pairs whose first layer has BN statistics (the ones
  high-bias absorption and analytic bias correction can model); a zoo
  model's (`bn_pairs` None) all."""
  if bn_pairs is None:
    return pairs
  return tuple(p for p in pairs if p.first in (bn_stats or {}))


def _timer(seconds: dict[str, float]):
  def timed(name, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(jax.tree.leaves(out))
    seconds[name] = round(time.perf_counter() - t0, 3)
    return out
  return timed


def prepare(model: nn.Module, variables: PyTree, batches: Sequence[Any],
            options: PTQOptions = PTQOptions()) -> Prepared:
  """Steps 1-3 (folding, equalization, quantizers) and the recorded inputs.

  A plain flax model is wrapped (`as_quantizable`); its BNs are folded into
  the layers the traced computation pairs them with. An NNX model's
  `variables` may be None (its own state) or `nnx.state(model)`.
  """
  if isinstance(model, nnx.Module) and (variables is None
                                        or isinstance(variables, nnx.State)):
    variables = nnx_variables(model if variables is None else variables)
  batches = _check_batches(batches)
  first = batches[0]["image"] if isinstance(batches[0], dict) else batches[0]
  report: dict[str, Any] = {"options": dataclasses.asdict(options), "seconds": {}}
  timed = _timer(report["seconds"])
  model = as_quantizable(model)
  bn_pairs = None
  if isinstance(model, Quantized):
    variables = _with_quant_params(quantized_model(model, options), variables, first)
    bn_pairs = timed("bn_pairs", folding.traced_bn_pairs, model, variables,
                     np.shape(first))
    report["bn_pairs"] = [[p.name, "/".join(p.bn_path)] for p in bn_pairs]
  bn_stats = None
  if options.fold_bn and bn_pairs != ():  # () : a plain model without conv -> BN.
    bn_stats = folding.bn_output_stats(variables, pairs=bn_pairs)
    variables = timed("fold_bn", folding.fold_batch_norms, model, variables,
                      pairs=bn_pairs)
  pairs = ()
  if bn_pairs is not None and (options.cle or options.bias_correction == "analytic"):
    pairs = timed("eq_pairs", wrapped.equalization_pairs, model, variables,
                  np.shape(first), bn_pairs)
    report["eq_pairs"] = [list(p) for p in pairs]
  elif options.cle:
    pairs = eq_lib.equalization_pairs(model)
  if options.cle:
    eq = timed("cle", eq_lib.cross_layer_equalization, variables, pairs,
               relu6=options.relu6, bn_stats=bn_stats, bn_pairs=bn_pairs)
    variables, bn_stats = eq.variables, eq.bn_stats
    report["cle_passes"] = int(eq.passes)
    if options.high_bias_absorption:
      eq = timed("high_bias_absorption", eq_lib.absorb_high_bias, variables,
                 _with_stats(pairs, bn_stats, bn_pairs), bn_stats,
                 relu6=options.relu6, spatial=False, bn_pairs=bn_pairs)
      variables, bn_stats = eq.variables, eq.bn_stats
  if options.cle and options.relu6 == "relu" and getattr(model, "clip_relu", False):
    model = model.clone(clip_relu=False)
  qmodel = quantized_model(model, options)
  variables = _with_quant_params(qmodel, variables, first)
  recorded = timed("record_inputs", record_layer_inputs, qmodel, variables, batches)
  return Prepared(qmodel, variables, bn_stats, tuple(pairs), batches, recorded, report,
                  bn_pairs)


def quantize(key: PRNGKey, prepared: Prepared, policy: Policy,
             options: PTQOptions = PTQOptions()) -> PTQResult:
  """Steps 4-7 for one policy on a `prepare`d model."""
  report = {**prepared.report, "seconds": dict(prepared.report["seconds"])}
  timed = _timer(report["seconds"])
  qmodel, variables, batches = prepared.model, prepared.variables, prepared.batches
  variables = timed("weight_range", calibrate, qmodel, variables, batches, policy,
                    weights=True, activations=False, recorded=prepared.recorded)
  if options.adaround:
    result = timed("adaround", adaround_lib.adaround_model, key, qmodel, variables,
                   batches, policy, range_method=options.weight_range,
                   iters=options.adaround_iters, sequential=options.adaround_sequential)
    report["adaround_layer_seconds"] = result.seconds
    if isinstance(qmodel, Quantized):  # Ops without a geometry keep nearest rounding.
      report["adaround_skipped"] = [n for n in prepared.recorded
                                    if n not in result.seconds]
    variables = folding.copy_tree(result.variables)
    for name, rng in result.ranges.items():
      layer = folding.get_path(variables["params"], tuple(name.split("/")))
      layer["weight_quant"] = {"lo": jnp.asarray(rng["lo"], jnp.float32),
                               "hi": jnp.asarray(rng["hi"], jnp.float32)}
  elif options.bias_correction == "empirical":
    variables = timed("bias_correction", bc_lib.empirical_bias_correction, qmodel,
                      variables, batches, policy, pairs=prepared.bn_pairs)
  elif options.bias_correction == "analytic":
    if prepared.bn_stats is None and prepared.bn_pairs != ():
      raise ValueError("bias_correction is 'analytic' with fold_bn False; allowed: "
                       "analytic correction on folded BatchNorms")
    pairs = (_with_stats(prepared.pairs, prepared.bn_stats, prepared.bn_pairs)
             if prepared.bn_pairs is not None
             else prepared.pairs or eq_lib.equalization_pairs(qmodel))
    variables = timed("bias_correction", bc_lib.analytic_bias_correction, qmodel,
                      variables, policy, pairs, prepared.bn_stats,
                      bn_pairs=prepared.bn_pairs)
  variables = timed("act_range", calibrate, qmodel, variables, batches, policy,
                    weights=False, activations=True, recorded=prepared.recorded)
  report["total_seconds"] = round(sum(report["seconds"].values()), 3)
  return PTQResult(qmodel, variables, report)


def ptq(key: PRNGKey, model: nn.Module, variables: PyTree, batches: Sequence[Any],
        policy: Policy, options: PTQOptions = PTQOptions()) -> PTQResult:
  """Post-training quantization of a trained model under `policy`.

  Args:
    key: PRNG key (AdaRound's mini-batches).
    model: the floating-point model: a haqjax zoo model or any model built
      from `QConv`/`QDense` + `conv_bn`, or a plain `flax.linen` model
      (wrapped by `haqjax.nn.quantized` here if it is not already). For a
      plain model the BNs are folded by data flow
      (`folding.traced_bn_pairs`), AdaRound and bias correction take its
      `nn.Conv` and `nn.Dense` ops (`haqjax.ptq.wrapped`), the other ops
      (matmuls of two activations included) are calibrated only, and
      `cle`, high-bias absorption and analytic bias correction take the
      layer pairs the traced computation joins by only a BN, ReLU/ReLU6 or
      per-channel pooling (`wrapped.equalization_pairs`; absorption and
      analytic correction those whose first layer has a BN). A flax NNX
      model (`nnx.Module`) is taken the same way (`haqjax.nn.nnx_quantized`:
      its `nnx.Conv` -> `nnx.BatchNorm` pairs fold, AdaRound takes its
      `nnx.Conv` and `nnx.Linear` ops); `haqjax.nn.nnx_update(model,
      result.variables)` writes the folded, rounded weights back into it
      (in floating point: the quantizers are the linen module's).
    variables: its trained `{"params", "batch_stats"}`; for an NNX model
      also None (its own state) or `nnx.state(model)`.
    batches: calibration batches (dicts with "image" and optional "mask", or
      image arrays), read several times.
    policy: per-layer bits (any mix; 32 leaves a tensor in floating point).
    options: the steps.

  Returns:
    A `PTQResult`; `result.model.apply(result.variables, x, policy=policy)`
    runs the quantized network.

  Raises:
    ValueError: no batches, non-finite images or activations, or a policy
      that does not fit the model.
  """
  return quantize(key, prepare(model, variables, batches, options), policy, options)


class PTQScorer:
  """Scores bit policies by PTQ accuracy: a search's fast accuracy signal.

  Folding, equalization and the recording of the calibration activations do
  not depend on the policy and run once; each call sets the ranges (and bias
  correction or AdaRound, as `options` say) for its policy and evaluates on
  `split` (a held-out split, never the test split) with one compiled eval
  step for every policy::

      scorer = PTQScorer(model, variables, batches, splits.val)
      top1 = scorer(policy)["top1"]
  """

  def __init__(self, model: nn.Module, variables: PyTree, batches: Sequence[Any],
               split: Any, *, options: PTQOptions = PTQOptions(adaround=False),
               eval_batch_size: int = 500, key: PRNGKey | None = None):
    from haqjax.train.trainer import Evaluator  # pylint: disable=g-import-not-at-top
    self.options = options
    self.prepared = prepare(model, variables, batches, options)
    self._split = split
    self._key = jax.random.key(0) if key is None else key
    self._evaluate = Evaluator(self.prepared.model, None, eval_batch_size)

  def trace_counts(self) -> dict[str, int]:
    """How often the eval step was traced (1 for every policy)."""
    return {"eval": self._evaluate.traces}

  def __call__(self, policy: Policy) -> dict[str, float]:
    """`{"top1", "top5", "loss", "seconds"}` of `policy` after PTQ."""
    t0 = time.perf_counter()
    # The key depends on the policy only, so a resumed search scores as before.
    digest = hashlib.sha256(np.asarray(policy.w_bits, np.int32).tobytes()
                            + np.asarray(policy.a_bits, np.int32).tobytes()).digest()
    key = jax.random.fold_in(self._key, int.from_bytes(digest[:4], "little") >> 1)
    result = quantize(key, self.prepared, policy, self.options)
    metrics = self._evaluate(result.variables, self._split, policy)
    return {**metrics, "seconds": time.perf_counter() - t0}
