"""The user's model made quantizable, fine-tuned and scored, in one call each.

`quantize` takes any model, a plain `flax.linen` one (wrapped by
`haqjax.nn.quantized`) or one of haqjax's layers (used as it is), with the
user's variables, and returns the model called as haqjax calls models
(`apply(variables, x, policy=..., train=...)`) and its variables with the
quantizer parameters added. `finetune` and `evaluate` run the trainer's own
compiled steps (`haqjax.train.steps`, `haqjax.train.trainer.Evaluator`)
over the user's data: numpy arrays, an iterable of batches or a haqjax
`Split` (`haqjax.data.as_split`)::

    qmodel, qvars = haqjax.quantize(model, variables, x_train[:1])
    policy = haqjax.Policy.uniform(haqjax.layer_table(qmodel, x_train.shape).names, 4, 4)
    qvars = haqjax.finetune(qmodel, qvars, (x_train, y_train), policy, epochs=1)
    haqjax.evaluate(qmodel, qvars, (x_test, y_test), policy)["top1"]

An NNX model (`nnx.Module`) is taken as it is, converted once
(`haqjax.nn.nnx_quantized`), with `variables` None (its own state) or its
state (`nnx.state(model)`) or linen-layout variables; the variables that
come back are in linen's layout (`haqjax.nn.nnx_variables`), and
`haqjax.nn.nnx_update(model, qvars)` writes them back into it::

    qmodel, qvars = haqjax.quantize(nnx_model, None, x_train[:1])
    haqjax.nn.nnx_update(nnx_model, haqjax.finetune(nnx_model, None, (x, y), None))

Quantizers default to the jobs' defaults: min-max weights and static
activation ranges calibrated on a few training batches (`calibrate`, which
`finetune` and the searches call for every policy).

What is reported is what deploys: with a policy, `evaluate` also runs the
integer model (`haqjax.deploy`: int8 codes, int32 accumulators, fixed-point
requantization) on the same data where the integer engine can lower the
model (`integer_scores`, which `haqjax.search_policy` reports too)::

    scores = haqjax.evaluate(qmodel, qvars, (x_test, y_test), policy)
    scores["top1"], scores["integer_top1"], scores["integer_agreement"]
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import weakref
from typing import Any

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from haqjax import data as haq_data
from haqjax import quant
from haqjax.deploy import build as deploy_build
from haqjax.deploy import engine as deploy_engine
from haqjax.nn import calibrate as calibrate_lib
from haqjax.nn.nnx_model import FromNnx
from haqjax.nn.nnx_model import nnx_quantized
from haqjax.nn.nnx_model import nnx_variables
from haqjax.nn.quantized import Quantized
from haqjax.nn.quantized import init_quantizers
from haqjax.nn.quantized import quantized
from haqjax.policy import Policy
from haqjax.search import scoring
from haqjax.train import steps
from haqjax.train import trainer
from haqjax.typing import PyTree

# Variable collections the trainer's steps carry.
COLLECTIONS = ("params", "batch_stats")
# Examples of the data that `integer_scores` builds the integer graph from.
_EXAMPLE_BATCH = 64
# NNX model -> {(quant_scheme, train_arg): its quantizable linen module}.
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_scheme(weight_quantizer: str = "minmax",
                   act_quantizer: str = "static") -> quant.QuantScheme:
  """The jobs' quantizers by name (`haqjax.quant.WEIGHT_QUANTIZERS`, `ACT_QUANTIZERS`)."""
  return quant.QuantScheme(weight=quant.weight_quantizer(weight_quantizer),
                           act=quant.act_quantizer(act_quantizer))


def takes_policy(model: nn.Module) -> bool:
  """Whether `model` is called with `policy=` (a haqjax model or a wrapped one)."""
  return "policy" in inspect.signature(type(model).__call__).parameters


def _sample(sample: Any) -> jax.Array:
  """One float32 input of the model's shape, from an example or a shape."""
  if isinstance(sample, tuple) and all(isinstance(d, int) for d in sample):
    return jnp.zeros((1, *sample[1:]), jnp.float32)
  x = np.asarray(sample)
  if x.ndim < 2:
    raise ValueError(f"sample has shape {x.shape}; allowed: a batch of inputs "
                     "[B, ...] or an input shape tuple")
  return jnp.zeros((1, *x.shape[1:]), jnp.float32)


def from_nnx(model: nnx.Module, quant_scheme: quant.QuantScheme | None = None,
             train_arg: str | None = "auto") -> Quantized:
  """The NNX `model` as a quantizable linen module, converted once per model.

  The same module for every call with the same `model` (held weakly), so
  the compiled steps (`evaluate`, `finetune`) are reused.
  """
  scheme = quant_scheme or default_scheme()
  done = _CONVERTED.setdefault(model, {})
  if (scheme, train_arg) not in done:
    done[scheme, train_arg] = nnx_quantized(model, scheme, train_arg=train_arg)
  return done[scheme, train_arg]


def _converted(model: Any, variables: Any, split: haq_data.Split
               ) -> tuple[nn.Module, PyTree]:
  """An NNX model and its variables as `quantize` returns them; others as given."""
  if not isinstance(model, nnx.Module):
    return model, variables
  return quantize(model, variables, (1, *split.spec.image_shape))


def quantize(model: nn.Module | nnx.Module, variables: PyTree | None, sample: Any, *,
             quant_scheme: quant.QuantScheme | None = None,
             train_arg: str | None = "auto") -> tuple[nn.Module, PyTree]:
  """`(model, variables)` ready for a policy: the model wrapped if it needs to be.

  Args:
    model: a plain `flax.linen` model (wrapped by `haqjax.nn.quantized`), one
      already wrapped, a model built from haqjax layers (taking `policy=`;
      its own quantizers are kept), or a flax NNX model (`nnx.Module`,
      converted once by `haqjax.nn.nnx_quantized`).
    variables: the user's trained variables (`params`, `batch_stats`); for
      an NNX model also None (its own state) or `nnx.state(model)`.
    sample: an input batch (only its shape is used) or an input shape.
    quant_scheme: the quantizers of a wrapped model; default
      `default_scheme()` (min-max weights, static activation ranges).
    train_arg: the model's mode argument (`haqjax.nn.quantized`).

  Returns:
    The model and `variables` with the quantizer parameters added (the
    user's arrays unchanged; quantizers not yet calibrated). For an NNX
    model: a linen module called `apply(variables, x, policy=..., train=...)`
    and variables in linen's layout (`haqjax.nn.nnx_variables`), which
    `haqjax.nn.nnx_update` writes back into the NNX model.

  Raises:
    ValueError: `variables` do not fit the model, or as `haqjax.nn.quantized`.
  """
  x = _sample(sample)
  if isinstance(model, nnx.Module):
    if variables is None or isinstance(variables, nnx.State):
      variables = nnx_variables(model if variables is None else variables)
    model = from_nnx(model, quant_scheme, train_arg)
  elif variables is None:
    raise ValueError("variables is None for a flax.linen model; allowed: its "
                     "variables (None only for an nnx.Module)")
  variables = {"batch_stats": {}, **{k: v for k, v in variables.items() if k in COLLECTIONS}}
  if not takes_policy(model):
    model = quantized(model, quant_scheme or default_scheme(), train_arg=train_arg)
  if isinstance(model, Quantized):
    return model, init_quantizers(model, variables, x)
  tx = optax.identity()
  state = steps.init_state(jax.random.key(0), model, tx, x.shape)
  state = trainer.merge_variables(state, variables, tx,
                                  source="variables", model=type(model).__name__)
  return model, state.variables()


def calibrate(model: nn.Module | nnx.Module, variables: PyTree | None, data: Any,
              policy: Policy | tuple[Policy, ...], *, batch_size: int = 128,
              batches: int = 4, seed: int = 0) -> PyTree:
  """Variables with the quantizers calibrated for `policy` on `batches` batches of `data`.

  Quantizers without parameters (min-max) leave the variables unchanged. An
  NNX model is taken as `quantize` takes it (linen-layout variables back).
  A tuple of policies calibrates once per policy and stacks the parameters
  (`haqjax.nn.calibrate.calibrate_candidates`: a differentiable search's
  quantizer per candidate bit-width).
  """
  split = haq_data.as_split(data)
  model, variables = _converted(model, variables, split)
  if not scoring.has_quant_params(variables["params"]):
    return variables
  chosen = itertools.islice(haq_data.batches(
      split, batch_size=batch_size, seed=seed, epoch=0, shuffle=True,
      drop_remainder=False), batches)
  if isinstance(policy, Policy):
    return calibrate_lib.calibrate(model, variables, chosen, policy)
  return calibrate_lib.calibrate_candidates(model, variables, chosen, policy)


def evaluate(model: nn.Module | nnx.Module, variables: PyTree | None, data: Any,
             policy: Policy | None = None, *, batch_size: int = 500,
             integer: bool | str = "auto") -> dict[str, Any]:
  """Loss, top-1 and top-5 (percent) of `model` under `policy` on `data`.

  With a policy, the integer model's top-1 on the same data too (what
  deploys; `integer_scores`).

  Args:
    model: a model taking `policy=` (see `quantize`), or an NNX model.
    variables: its variables (with quantizer parameters when `policy` is set;
      for an NNX model also None or its state, as `quantize` takes them).
    data: numpy arrays, batches or a `Split` (`haqjax.data.as_split`).
    policy: the bits; None: floating point.
    batch_size: evaluation batch size (the last batch is padded and masked).
    integer: 'auto': add the integer model's figures where `haqjax.deploy`
      lowers the model (no integer keys for one it cannot lower, e.g. layer
      norms or attention, nor without a policy); True: add them, or for a
      model it cannot lower `integer_top1` None and `integer_reason`, one
      line naming what stops it; False: fake-quant figures only.

  Returns:
    `{"loss", "top1", "top5", "count"}` of the fake-quantized model, and
    where the integer model is built `"integer_top1"` (percent) and
    `"integer_agreement"` (percent of examples whose integer prediction is
    the fake-quantized model's).

  Raises:
    ValueError: `integer` is not True, False or 'auto', or True without a
      policy.
  """
  if not (isinstance(integer, bool) or integer == "auto"):
    raise ValueError(f"integer is {integer!r}; allowed: True, False or 'auto'")
  if integer is True and policy is None:
    raise ValueError("integer=True with policy None; allowed: a policy (a float "
                     "model has no integer model), or integer='auto' or False")
  split = haq_data.as_split(data, name="test")
  model, variables = _converted(model, variables, split)
  try:
    evaluator = _evaluator(model, batch_size)
  except TypeError:  # A model holding unhashable values: compiled for this call.
    evaluator = trainer.Evaluator(model, None, batch_size)
  scores = evaluator(_collections(variables), split, policy)
  if integer is False or policy is None:
    return scores
  found = integer_scores(model, variables, policy, split, batch_size)
  if found["top1"] is not None:
    scores.update(integer_top1=found["top1"], integer_agreement=found["agreement"])
  elif integer is True:
    scores.update(integer_top1=None, integer_reason=found["reason"])
  return scores


def integer_scores(model: nn.Module, variables: PyTree, policy: Policy,
                   split: haq_data.Split, batch_size: int = 500) -> dict[str, Any]:
  """Top-1 of the integer model (`haqjax.deploy`) on `split`, or why it has none.

  The graph is built once (`haqjax.deploy.build.build`, from the split's
  first examples) and run over every example in order; each prediction is
  compared with the fake-quantized model's (`model.apply` in eval mode, the
  evaluation's quant key), so a gap between the two top-1s shows as
  disagreements.

  Args:
    model: a model taking `policy=` (a haqjax model, or a wrapped or
      converted flax one, as `quantize` returns it).
    variables: its calibrated variables.
    policy: the bits.
    split: the data (`haqjax.data.as_split`).
    batch_size: evaluation batch size.

  Returns:
    `{"top1": percent, "agreement": percent of predictions equal to the
    fake-quantized model's}` where the model lowers, else `{"top1": None,
    "reason": one line}` (e.g. an op the integer graph has no node for:
    layer norms, softmax attention).
  """
  example = next(iter(haq_data.batches(split, batch_size=min(len(split), _EXAMPLE_BATCH),
                                       shuffle=False, drop_remainder=False)))["image"]
  try:
    graph = deploy_build.build(model, variables, policy, example)
  except Exception as e:  # pylint: disable=broad-except
    return {"top1": None, "reason": f"{type(e).__name__}: {str(e).splitlines()[0]}"[:300]}
  try:
    predict = _predictor(model)
  except TypeError:  # A model holding unhashable values: compiled for this call.
    predict = _predictor.__wrapped__(model)
  variables = _collections(variables)
  correct = same = total = 0.0
  for index, batch in enumerate(haq_data.batches(split, batch_size=batch_size, seed=0,
                                                 epoch=0, shuffle=False,
                                                 drop_remainder=False)):
    ours = np.argmax(np.asarray(deploy_engine.run(graph, batch["image"])), -1)
    theirs = np.asarray(predict(variables, batch["image"], policy, index))
    mask = np.asarray(batch.get("mask", np.ones(len(ours))), np.float64)
    correct += float(np.sum((ours == np.asarray(batch["label"])) * mask))
    same += float(np.sum((ours == theirs) * mask))
    total += float(np.sum(mask))
  total = max(total, 1.0)
  return {"top1": 100.0 * correct / total, "agreement": 100.0 * same / total}


@functools.lru_cache(maxsize=8)
def _predictor(model: nn.Module):
  """The fake-quantized model's jitted predictions, keyed as `steps.eval_step`."""

  def predict(variables, images, policy, index):
    key = jax.random.fold_in(jax.random.key(steps.EVAL_SEED), index)
    logits = model.apply(variables, images, policy=policy, train=False, rngs={"quant": key})
    return jnp.argmax(logits, -1)

  return jax.jit(predict)


@functools.lru_cache(maxsize=8)
def _evaluator(model: nn.Module, batch_size: int) -> trainer.Evaluator:
  """The compiled evaluation of a model (kept: one compile per model and shape)."""
  return trainer.Evaluator(model, None, batch_size)


def _collections(variables: PyTree) -> PyTree:
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


@functools.lru_cache(maxsize=8)
def _train_step(model: nn.Module, total: int, warmup: int, learning_rate: float,
                optimizer: str, momentum: float, weight_decay: float, label_smoothing: float):
  """`(tx, step(state, batch, policy, key))` of a recipe, compiled once for all policies."""
  # A warm-up over every step never reaches the cosine (whose length must be > 0).
  schedule = steps.make_schedule(name="cosine", peak=learning_rate,
                                 total_steps=max(total, warmup + 1), warmup_steps=warmup)
  tx = steps.make_optimizer(name=optimizer, learning_rate=schedule, momentum=momentum,
                            weight_decay=weight_decay)

  def step(state, batch, policy, key):
    return steps.train_step(model, tx, state, batch, policy,
                            label_smoothing=label_smoothing, key=key)

  return tx, jax.jit(step)


def _frozen_bn(model: nn.Module) -> nn.Module:
  """`model` with its BatchNorm layers on frozen statistics (a zoo model or a wrapped one)."""
  if isinstance(model, Quantized) and isinstance(model.model, FromNnx):
    return model.clone(freeze_bn_stats=True,
                       model=model.model.clone(freeze_bn_stats=True))
  if "freeze_bn_stats" not in {f.name for f in dataclasses.fields(model)}:
    raise ValueError(f"freeze_bn_stats=True for a {type(model).__name__}; allowed: "
                     "haqjax's zoo models and models wrapped by haqjax.nn.quantized")
  return model.clone(freeze_bn_stats=True)


def finetune(model: nn.Module | nnx.Module, variables: PyTree | None, train: Any,
             policy: Policy | None, *, epochs: float = 1.0, learning_rate: float = 0.01,
             batch_size: int = 128, optimizer: str = "sgd", momentum: float = 0.9,
             weight_decay: float = 0.0, label_smoothing: float = 0.0,
             warmup_epochs: float = 0.0, calibration_batches: int = 4,
             seed: int = 0, freeze_bn_stats: bool = False) -> PyTree:
  """QAT of `model` under `policy` on `train` (FP32 training when `policy` is None).

  The trainer's step (`haqjax.train.steps.train_step`, compiled once) with a
  cosine schedule from `learning_rate` (`haqjax.train.steps.make_schedule`:
  with `warmup_epochs`, a linear rise from 0 first, so the first step moves
  nothing; without, the cosine starts at the peak); quantizers are
  calibrated for `policy` first. Data order depends on `seed` and the epoch
  only.

  Args:
    model: a model taking `policy=` (see `quantize`), or an NNX model.
    variables: its variables (with quantizer parameters when `policy` is set;
      for an NNX model also None or its state, as `quantize` takes them).
    train: numpy arrays, batches or a `Split` (`haqjax.data.as_split`).
    policy: the bits; None: floating point.
    epochs: passes over `train` (a fraction allowed).
    learning_rate: peak learning rate.
    batch_size: training batch size.
    optimizer: 'sgd' (Nesterov) or 'adamw'.
    momentum: SGD momentum or AdamW's b1.
    weight_decay: L2 on kernels.
    label_smoothing: of the cross-entropy.
    warmup_epochs: epochs (a fraction allowed, rounded up to whole steps)
      over which the learning rate rises linearly from 0 to `learning_rate`
      before the cosine decay, which ends with the last step as without
      warm-up; 0 (default): no warm-up. Training from scratch with AdamW
      (e.g. a transformer) usually wants one epoch or so.
    calibration_batches: batches that calibrate the quantizers first.
    seed: data order and the `quant` stream of stochastic rounding.
    freeze_bn_stats: BatchNorm layers normalize with their running
      statistics and keep them (their scale and bias still train): steadier
      QAT at 2-3 bits, where a channel that quantization flattens has a
      batch variance of zero (`haqjax.train.Config.freeze_bn_stats`).

  Returns:
    The fine-tuned variables (of an NNX model: in linen's layout, for
    `haqjax.nn.nnx_update`).

  Raises:
    ValueError: `epochs` not positive, `warmup_epochs` outside `0..epochs`,
      or `train` has fewer examples than a batch.
  """
  if not epochs > 0:
    raise ValueError(f"epochs={epochs!r}; allowed: > 0")
  if not 0 <= warmup_epochs <= epochs:
    raise ValueError(f"warmup_epochs={warmup_epochs!r}; allowed: 0..epochs ({epochs!r})")
  split = haq_data.as_split(train)
  per_epoch = haq_data.num_batches(split, batch_size, drop_remainder=True)
  if not per_epoch:
    raise ValueError(f"batch_size={batch_size} is larger than the training data "
                     f"({len(split)} examples)")
  model, variables = _converted(model, variables, split)
  variables = _collections(variables)
  if freeze_bn_stats:
    model = _frozen_bn(model)
  if policy is not None:
    variables = calibrate(model, variables, split, policy, batch_size=batch_size,
                          batches=calibration_batches, seed=seed)
  total = max(1, math.ceil(epochs * per_epoch))
  warmup = min(total, math.ceil(warmup_epochs * per_epoch))
  recipe = (model, total, warmup, learning_rate, optimizer, momentum, weight_decay,
            label_smoothing)
  try:
    tx, step = _train_step(*recipe)
  except TypeError:  # A model holding unhashable values: compiled for this call.
    tx, step = _train_step.__wrapped__(*recipe)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]))
  key = jax.random.key(seed)
  done, epoch = 0, 0
  while done < total:
    for batch in haq_data.batches(split, batch_size=batch_size, seed=seed, epoch=epoch,
                                  shuffle=True, drop_remainder=True):
      state, _ = step(state, batch, policy, key)
      done += 1
      if done == total:
        break
    epoch += 1
  return state.variables()
