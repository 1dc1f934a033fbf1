"""Pure training and evaluation steps, shared by FP32 training and QAT.

The policy is an argument of every step, so one compiled step serves every
bit policy (QAT fine-tunes inside a search call the same compiled function for
each candidate policy).

Quantizers that round stochastically draw from the model's `quant` RNG
stream. A training step given a base `key` feeds that stream with
`fold_in(key, state.step)`, so no two steps share a key and a resumed run
draws what an uninterrupted one would. Evaluation feeds it from the fixed
`EVAL_SEED` (folded with the batch index), so it stays deterministic.

Models with `nn.Dropout` (a plain flax model wrapped by
`haqjax.nn.quantized`) draw from the `dropout` stream in training:
`fold_in(fold_in(key, DROPOUT_STREAM), state.step)`, a fresh key per step
(from `key(EVAL_SEED)` when no `key` is given). Evaluation runs in eval mode,
where dropout draws nothing.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from haqjax.policy import Policy
from haqjax.typing import Array
from haqjax.typing import ArrayLike
from haqjax.typing import PRNGKey
from haqjax.typing import PyTree

Batch = dict[str, Array]
Metrics = dict[str, Array]

# Seed of the `quant` stream in evaluation: the same noise for every call.
EVAL_SEED = 0
# Folded into a training step's base key for the `dropout` stream.
DROPOUT_STREAM = 2


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; checkpointed as is."""
  step: Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree

  def variables(self) -> dict[str, PyTree]:
    return {"params": self.params, "batch_stats": self.batch_stats}


def decay_mask(params: PyTree) -> PyTree:
  """Weight decay on kernels only (not biases, BN scales or quantizer params)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(*, name: str, learning_rate: optax.ScalarOrSchedule,
                   momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and L2 on kernels, or AdamW."""
  if name == "sgd":
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=momentum > 0))
  if name == "adamw":
    return optax.adamw(learning_rate, b1=momentum, weight_decay=weight_decay,
                       mask=decay_mask)
  raise ValueError(f"optimizer={name!r} is not allowed; allowed: sgd, adamw")


def make_schedule(*, name: str, peak: float, total_steps: int,
                  warmup_steps: int) -> optax.Schedule:
  """Linear warm-up, then cosine decay to 0 or a constant rate."""
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else peak, peak, warmup_steps, max(total_steps, 1))
  if name == "constant":
    if not warmup_steps:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
        [warmup_steps])
  raise ValueError(f"schedule={name!r} is not allowed; allowed: cosine, constant")


def init_state(key: PRNGKey, model: nn.Module, tx: optax.GradientTransformation,
               input_shape: tuple[int, ...]) -> TrainState:
  """Initial parameters (floating point) and optimizer state."""
  variables = model.init(key, jnp.zeros((1, *input_shape[1:]), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


def _topk_correct(logits: Array, labels: Array, k: int) -> Array:
  k = min(k, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]  # [B, k]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def _loss(logits: Array, labels: Array, label_smoothing: float) -> Array:
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)  # [B]


def dropout_key(key: PRNGKey | None, step: ArrayLike) -> PRNGKey:
  """The `dropout` stream's key of training step `step`: one per step, never reused.

  `fold_in(fold_in(key, DROPOUT_STREAM), step)`, apart from the `quant`
  stream's `fold_in(key, step)`; `key(EVAL_SEED)` stands in for a None `key`.
  """
  base = jax.random.key(EVAL_SEED) if key is None else key
  return jax.random.fold_in(jax.random.fold_in(base, DROPOUT_STREAM), step)


def train_step(model: nn.Module, tx: optax.GradientTransformation, state: TrainState,
               batch: Batch, policy: Policy | None, *, label_smoothing: float = 0.0,
               key: PRNGKey | None = None) -> tuple[TrainState, Metrics]:
  """One SGD step on `batch` under `policy` (None: floating point).

  Args:
    model: the model; `train=True` in this step.
    tx: the optimizer.
    state: parameters, BN statistics, optimizer state and step count.
    batch: `{"image": [B, H, W, C], "label": [B]}`.
    policy: the bit policy (None: floating point).
    label_smoothing: label smoothing of the cross-entropy.
    key: base key of the `quant` RNG stream (stochastic rounding); this step
      draws from `fold_in(key, state.step)`. None: no `quant` stream, which
      only quantizers that round deterministically allow. The `dropout`
      stream is `dropout_key(key, state.step)`.

  Returns:
    The next state and this step's loss, top-1 and gradient norm.
  """
  rngs = {"dropout": dropout_key(key, state.step)}
  if key is not None:
    rngs["quant"] = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        policy=policy, train=True, mutable=["batch_stats"], rngs=rngs)
    loss = jnp.mean(_loss(logits, batch["label"], label_smoothing))
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "top1": jnp.mean(_topk_correct(logits, batch["label"], 1)),
      "grad_norm": optax.global_norm(grads),
  }
  return TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                    opt_state=opt_state), metrics


def eval_step(model: nn.Module, variables: dict[str, PyTree], batch: Batch,
              policy: Policy | None, index: ArrayLike = 0) -> Metrics:
  """Sums over the real (mask 1) examples of `batch`: loss, top-1, top-5, count.

  Stochastic rounding draws from `fold_in(key(EVAL_SEED), index)`: `index`
  (the batch's position in the split) gives each batch its own noise, and
  the same batch the same noise in every evaluation.
  """
  key = jax.random.fold_in(jax.random.key(EVAL_SEED), index)
  logits = model.apply(variables, batch["image"], policy=policy, train=False,
                       rngs={"quant": key})
  mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
  return {
      "loss": jnp.sum(_loss(logits, batch["label"], 0.0) * mask),
      "top1": jnp.sum(_topk_correct(logits, batch["label"], 1) * mask),
      "top5": jnp.sum(_topk_correct(logits, batch["label"], 5) * mask),
      "count": jnp.sum(mask),
  }


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
  """Turns summed eval metrics into means (top-1/top-5 in percent)."""
  n = max(float(sums["count"]), 1.0)
  return {"loss": float(sums["loss"]) / n, "top1": 100.0 * float(sums["top1"]) / n,
          "top5": 100.0 * float(sums["top5"]) / n, "count": int(sums["count"])}
