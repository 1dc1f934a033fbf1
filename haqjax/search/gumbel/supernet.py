"""The differentiable bit search's pure `init` and `train_step` (DNAS / EdMIPS).

Each quantizable layer `l` has architecture logits over K candidate
bit-widths for its weights and for its input activations, `[L, K]` each. A
training step relaxes them (`relax.py`), runs the model under the resulting
`SoftPolicy` (every layer quantizes to the mixture of its candidates and runs
one convolution; with `per_candidate`, each candidate with its own quantizer,
as EdMIPS keeps one per bit-width) and minimises

    task loss + penalty(E[cost] / limit),

where `E[cost] = expected_from_tensor(T, w_mix, a_mix)` (computed as
`batch_invariant.mixture_cost`) contracts the `[L, K, K]` cost tensor `T` of
the candidates (the budget wall's, so the same
hardware model as the RL search) with the very mixing weights the network is
run with this step: `softmax(logits / tau)` for the 'softmax' relaxation, the
Gumbel-softmax sample for 'gumbel', its straight-through one-hot for 'hard'.
The penalty therefore prices the network that the task loss trains (one
distribution for both terms), and it is the exact cost of a discrete policy
whenever the mixture is one-hot. The penalty is a hinge
`hinge_weight * max(0, r - 1)`, TuNAS's absolute value `hinge_weight * |r - 1|`
(which also prices an unspent budget) or the Lagrangian term `mu * (r - 1)`, `mu`
starting at `multiplier_init` and updated by projected dual ascent,
`mu <- max(0, mu + dual_lr * (r - 1))`, so that the cost settles at the budget.

Weights and logits have their own optimizers, joined by
`optax.multi_transform`: SGD with Nesterov momentum and L2 on kernels for the
weights, Adam for the logits. Both learning rates are applied outside the
transforms, from `HParams`, so they too are arrays. The logits do not move
during the warm-up (`step < warmup_steps`) or once frozen
(`step >= freeze_step`); their Adam state is then left as it was.

Everything a sweep varies (penalty weight, budget limit, temperatures,
learning rates, schedule points) is in `HParams`, a NamedTuple of arrays
passed to every step, and the key is in the state; nothing swept is baked into
the compiled step. A batch of searches is therefore::

    hp = jax.tree.map(lambda *x: jnp.stack(x), hp_a, hp_b)
    keys = jax.random.split(key, 2)
    states = jax.vmap(search.init, in_axes=(0, 0, None))(keys, hp, variables)
    states, metrics = jax.jit(jax.vmap(search.train_step, in_axes=(0, None, 0)))(
        states, batch, hp)

What is static is the model, the candidate bit-widths, the cost tensor, the
relaxation ('gumbel', 'hard', 'softmax') and the penalty form. Each member of
such a batch follows the trajectory of the same search run alone: the parts of
the step whose float arithmetic XLA compiled differently under `vmap` (the
temperature, the penalty's contraction, Adam's bias correction) are written
as `batch_invariant` explains, because one ulp can move a fake-quant code.

References:
  Wu et al. Mixed Precision Quantization of ConvNets via Differentiable
  Neural Architecture Search. 2018. https://arxiv.org/abs/1812.00090
  Cai & Vasconcelos. Rethinking Differentiable Search for Mixed-Precision
  Neural Networks. CVPR 2020. https://arxiv.org/abs/2004.05795
  Boyd & Vandenberghe. Convex Optimization, ch. 5 (duality). 2004.
  Bender et al. Can Weight Sharing Outperform Random Architecture Search? An
  Investigation With TuNAS. CVPR 2020. https://arxiv.org/abs/2008.06120
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from haqjax.hardware.cost import expected_from_tensor
from haqjax.policy import Policy
from haqjax.policy import SoftPolicy
from haqjax.search.gumbel import batch_invariant
from haqjax.search.gumbel import derive as derive_lib
from haqjax.search.gumbel import relax as relax_lib
from haqjax.search.gumbel.config import PENALTIES
from haqjax.train import steps
from haqjax.typing import Array, ArrayLike, PRNGKey, PyTree


class HParams(NamedTuple):
  """The swept hyper-parameters of a search: float32 arrays, `[]` each.

  Attributes:
    hinge_weight: the penalty's weight (penalties 'hinge' and 'absolute').
    multiplier_init: the Lagrange multiplier's initial value (penalty
      'lagrange').
    limit: the budget, in the cost tensor's unit.
    tau0: initial temperature.
    tau_min: final temperature.
    anneal_steps: steps over which the temperature decays (after warm-up).
    dual_lr: dual ascent step of the multiplier.
    arch_lr: Adam learning rate of the logits.
    weight_lr: SGD learning rate of the weights.
    warmup_steps: the logits train from this step on.
    freeze_step: the logits are frozen from this step on.
  """
  hinge_weight: Array
  multiplier_init: Array
  limit: Array
  tau0: Array
  tau_min: Array
  anneal_steps: Array
  dual_lr: Array
  arch_lr: Array
  weight_lr: Array
  warmup_steps: Array
  freeze_step: Array

  @classmethod
  def create(cls, **values: ArrayLike) -> HParams:
    """All fields as float32 arrays (missing ones raise a TypeError)."""
    return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


class GumbelState(NamedTuple):
  """Everything a search step changes; checkpointed as is.

  Attributes:
    step: steps done, int32 `[]`.
    params: the model's parameters.
    batch_stats: its BatchNorm statistics.
    logits: `{"w": [L, K], "a": [L, K]}` architecture logits.
    opt_state: `optax.multi_transform` state over `{"model", "arch"}`.
    multiplier: the Lagrange multiplier `[]` (unused by the hinge).
    key: the search's key; step `t` uses `fold_in(key, t)`, never the key.
  """
  step: Array
  params: PyTree
  batch_stats: PyTree
  logits: dict[str, Array]
  opt_state: PyTree
  multiplier: Array
  key: Array


def candidate_rows(bits: Sequence[int], fixed_w: np.ndarray, fixed_a: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Per-layer candidates `[L, K]`: `bits`, or a fixed layer's bits repeated."""
  b = np.asarray(bits, np.int64)[None, :]
  rows = [np.where(f[:, None] >= 0, f[:, None], b) for f in (fixed_w, fixed_a)]
  return rows[0], rows[1]


def candidate_tensor(layer_cost, w_bits: np.ndarray, a_bits: np.ndarray) -> np.ndarray:
  """`T[l, i, j]` = layer `l`'s cost at `(w_bits[l, i], a_bits[l, j])`, `[L, K, K]`.

  `layer_cost(w, a)` gives per-layer costs `[L]` of per-layer bits `[L]`
  (e.g. `BudgetWall.layer_costs`).
  """
  k = w_bits.shape[1]
  return np.stack([np.stack([layer_cost(w_bits[:, i], a_bits[:, j]) for j in range(k)],
                            axis=-1) for i in range(k)], axis=-2)


def search_candidates(bits: Sequence[int], wall, undominated: bool = False
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(w_bits, a_bits, tensor)` of a search under `wall` (a `BudgetWall`):
  `candidate_rows` and `candidate_tensor`, the dominated candidates widened
  (`widen_dominated`) when `undominated`."""
  w_rows, a_rows = candidate_rows(bits, wall.fixed.w, wall.fixed.a)
  tensor = candidate_tensor(wall.layer_costs, w_rows, a_rows)
  return widen_dominated(w_rows, a_rows, tensor) if undominated else (w_rows, a_rows, tensor)


def widen_dominated(w_bits: np.ndarray, a_bits: np.ndarray, tensor: np.ndarray,
                    rtol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Candidates that cost no less than a wider one, replaced by the widest such.

  A layer's weight candidate `i` is dominated when some wider candidate `j`
  costs no more than it whatever the layer's activation candidate
  (`tensor[l, j, :] <= tensor[l, i, :]`), and likewise for activations: no
  budget is ever better spent on `i`. Each dominated candidate takes the bits
  (and costs) of the widest candidate that dominates it, until none is left.
  A role whose bits cost nothing (weights under CIM's latency, activations
  under a size budget) then holds only its widest candidate, where a search
  would otherwise leave its logits near their start, the task loss alone
  barely moving them in a short search. Where costs do not rise with every
  bit (a layer bound by something the bits do not change), the candidates
  on a flat stretch give way to its widest.

  Args:
    w_bits, a_bits: `[L, K]` candidates per layer (`candidate_rows`).
    tensor: `[L, K, K]` their costs (`candidate_tensor`).
    rtol: costs within this relative tolerance count as equal.

  Returns:
    `(w_bits, a_bits, tensor)`, new arrays; a repeated candidate stands for
    its bits, as a fixed layer's repeated row does.
  """
  w, a = np.array(w_bits, np.int64), np.array(a_bits, np.int64)
  t = np.array(tensor, np.float64)
  changed = True
  while changed:
    changed = False
    # `costs[l, i]`: candidate i's costs over the other role's candidates (a view of t).
    for rows, costs in ((w, t), (a, t.transpose(0, 2, 1))):
      for l, i in np.ndindex(rows.shape):
        wider = [j for j in range(rows.shape[1]) if rows[l, j] > rows[l, i]
                 and np.all(costs[l, j] <= costs[l, i] * (1 + rtol))]
        if wider:
          j = max(wider, key=lambda j, l=l: rows[l, j])
          rows[l, i], costs[l, i] = rows[l, j], costs[l, j]
          changed = True
  return w, a, t


class GumbelSearch:
  """The static half of the search: model, candidates, costs, optimizers.

  Example::

      search = GumbelSearch(model, names, w_bits, a_bits, tensor, fixed,
                            per_candidate=True)
      start = calibrate_candidates(model, fp32_variables, batches,
                                   search.calibration_policies())
      state = search.init(jax.random.key(0), hp, start)
      state, metrics = jax.jit(search.train_step)(state, batch, hp)
      w, a = search.derive(state.logits)

  (`haqjax.nn.calibrate.calibrate_candidates`; the jobs and `haqjax.api`
  build the search from a `GumbelConfig`, per candidate by default.)

  Args:
    model: the flax model; called as `model.apply(v, x, policy=, train=)`.
    names: its quantizable layers, table order (`L`).
    w_bits, a_bits: `[L, K]` candidate bit-widths per layer.
    tensor: `[L, K, K]` costs of the candidates (`candidate_tensor`).
    fixed: `[L]` bool, layers whose bits no search changes (their rows
      are one bit-width repeated; their probabilities are one-hot).
    relaxation: 'gumbel', 'hard' or 'softmax'.
    penalty: 'lagrange', 'hinge' or 'absolute'.
    derivation: how the final probabilities become a policy within the
      budget, 'map' or 'wall' (`derive`).
    momentum: the weights' SGD momentum (Nesterov when > 0).
    weight_decay: L2 on kernels.
    label_smoothing: of the task loss.
    per_candidate: each layer keeps a quantizer per candidate bit-width
      (`SoftPolicy.per_candidate`): the start's variables hold their
      parameters stacked, calibrated for `calibration_policies()` by
      `haqjax.nn.calibrate.calibrate_candidates`. False: every candidate
      shares the layer's quantizer, calibrated at the top candidate.
  """

  def __init__(self, model: nn.Module, names: Sequence[str], w_bits: ArrayLike,
               a_bits: ArrayLike, tensor: ArrayLike, fixed: ArrayLike, *,
               relaxation: str = "gumbel", penalty: str = "lagrange",
               derivation: str = "map", momentum: float = 0.9, weight_decay: float = 0.0,
               label_smoothing: float = 0.0, per_candidate: bool = False):
    relax_lib.check_relaxation(relaxation)
    if penalty not in PENALTIES:
      raise ValueError(f"gumbel_penalty={penalty!r} is not allowed; allowed: "
                       f"{', '.join(PENALTIES)}")
    self.model = model
    self.names = tuple(names)
    self.w_bits = np.asarray(w_bits, np.int64)  # [L, K]
    self.a_bits = np.asarray(a_bits, np.int64)  # [L, K]
    self.tensor = np.asarray(tensor, np.float32)  # [L, K, K]
    self.fixed = np.asarray(fixed, bool)  # [L]
    n, k = self.w_bits.shape
    if (len(self.names) != n or self.a_bits.shape != (n, k)
        or self.tensor.shape != (n, k, k) or self.fixed.shape != (n,)):
      raise ValueError(f"shapes do not fit {len(self.names)} layers: w_bits "
                       f"{self.w_bits.shape}, a_bits {self.a_bits.shape}, tensor "
                       f"{self.tensor.shape}, fixed {self.fixed.shape}")
    derive_lib.check_derivation(derivation)
    self.relaxation, self.penalty, self.derivation = relaxation, penalty, derivation
    self.label_smoothing = label_smoothing
    self.per_candidate = per_candidate
    # Weights: SGD (Nesterov) with L2 on kernels; logits: Adam (written so
    # that a vmapped sweep computes it as one search does). Learning rates
    # are applied in the step, from HParams.
    weights = optax.chain(
        optax.add_decayed_weights(
            weight_decay, mask=steps.decay_mask),
        optax.trace(decay=momentum, nesterov=momentum > 0))
    self.tx = optax.multi_transform({"model": weights,
                                     "arch": batch_invariant.scale_by_adam()},
                                    {"model": "model", "arch": "arch"})

  # ----------------------------------------------------------------- pieces

  def probabilities(self, logits: dict[str, Array]) -> tuple[Array, Array]:
    """`softmax` of the logits, fixed layers one-hot: `([L, K], [L, K])`."""
    return self._pin(jax.nn.softmax(logits["w"])), self._pin(jax.nn.softmax(logits["a"]))

  def _pin(self, probs: Array) -> Array:
    onehot = jax.nn.one_hot(0, probs.shape[-1], dtype=probs.dtype)
    return jnp.where(self.fixed[:, None], onehot, probs)

  def soft_policy(self, w_probs: Array, a_probs: Array) -> SoftPolicy:
    return SoftPolicy(w_probs=w_probs, a_probs=a_probs,
                      w_bits=jnp.asarray(self.w_bits, jnp.int32),
                      a_bits=jnp.asarray(self.a_bits, jnp.int32), names=self.names,
                      per_candidate=self.per_candidate)

  def calibration_policies(self) -> Policy | tuple[Policy, ...]:
    """What the start's quantizers are calibrated for: one policy per candidate
    column (`per_candidate`), else the top candidates' policy."""
    if not self.per_candidate:
      return Policy.create(self.names, self.w_bits.max(1), self.a_bits.max(1))
    return tuple(Policy.create(self.names, self.w_bits[:, k], self.a_bits[:, k])
                 for k in range(self.w_bits.shape[1]))

  def eval_policy(self, w_bits: ArrayLike, a_bits: ArrayLike) -> Policy | SoftPolicy:
    """The discrete policy `([L], [L])` as the search's weights run it.

    A `Policy`; with `per_candidate`, the one-hot `SoftPolicy` that runs each
    layer at its bits with the quantizer of the candidate of those bits (of
    the nearest candidate above them when they are none, e.g. after HAQ's
    budget wall; else of the top one).
    """
    if not self.per_candidate:
      return Policy.create(self.names, w_bits, a_bits)
    rows, probs = [], []
    for cand, bits in ((self.w_bits, w_bits), (self.a_bits, a_bits)):
      bits = np.asarray(bits, np.int64)[:, None]
      d = cand - bits
      pick = np.argmin(np.where(d >= 0, d, 1000 - d), axis=1)
      onehot = np.eye(cand.shape[1], dtype=np.float32)[pick]
      rows.append(np.where(onehot > 0, bits, cand))
      probs.append(onehot)
    return SoftPolicy.create(self.names, probs[0], probs[1], rows[0], rows[1],
                             per_candidate=True)

  def expected_cost(self, logits: dict[str, Array]) -> Array:
    """The expected cost of the sampled discrete policy, `[]` (exact at one-hot)."""
    w, a = self.probabilities(logits)
    return expected_from_tensor(self.tensor, w, a)

  def derive(self, logits: dict[str, Array]) -> tuple[np.ndarray, np.ndarray]:
    """The argmax policy's bits `([L], [L])` (before any budget enforcement)."""
    probs = lambda x: np.asarray(jax.nn.softmax(jnp.asarray(x, jnp.float32), axis=-1))
    return derive_lib.argmax(probs(logits["w"]), probs(logits["a"]), self.w_bits, self.a_bits)

  def policy(self, logits: dict[str, Array]) -> Policy:
    return Policy.create(self.names, *self.derive(logits))

  # ------------------------------------------------------------ init / step

  def init(self, key: PRNGKey, hparams: HParams, variables: PyTree) -> GumbelState:
    """The search's start: `variables`' weights, uniform logits, `mu = multiplier_init`.

    Args:
      key: the search's key (stored; every step folds its index in).
      hparams: the swept hyper-parameters.
      variables: `{"params", "batch_stats"}` to start from (the FP32 model).

    Returns:
      The initial state.
    """
    n, k = self.w_bits.shape
    logits = {"w": jnp.zeros((n, k), jnp.float32), "a": jnp.zeros((n, k), jnp.float32)}
    params = variables["params"]
    return GumbelState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), logits=logits,
        opt_state=self.tx.init({"model": params, "arch": logits}),
        multiplier=jnp.asarray(hparams.multiplier_init, jnp.float32), key=key)

  def loss(self, trainable: dict[str, PyTree], state: GumbelState,
           batch: dict[str, Array], hparams: HParams, key: PRNGKey
           ) -> tuple[Array, tuple[Any, ...]]:
    """The search objective of one batch, and `(metrics, batch_stats)`."""
    k_w, k_a, k_q = jax.random.split(key, 3)
    logits = trainable["arch"]
    tau = relax_lib.temperature(state.step, hparams.tau0, hparams.tau_min,
                                hparams.warmup_steps, hparams.anneal_steps)
    w_mix = self._pin(relax_lib.relax(k_w, logits["w"], tau, self.relaxation))
    a_mix = self._pin(relax_lib.relax(k_a, logits["a"], tau, self.relaxation))
    out, updates = self.model.apply(
        {"params": trainable["model"], "batch_stats": state.batch_stats},
        batch["image"], policy=self.soft_policy(w_mix, a_mix), train=True,
        mutable=["batch_stats"],
        rngs={"quant": k_q, "dropout": jax.random.fold_in(key, steps.DROPOUT_STREAM)})
    labels = batch["label"]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, out.shape[-1]),
                                  self.label_smoothing)
    task = jnp.mean(optax.softmax_cross_entropy(out.astype(jnp.float32), targets))
    # The cost of the mixture the network ran with (see the module docstring).
    cost = batch_invariant.mixture_cost(self.tensor, w_mix, a_mix)
    excess = cost / hparams.limit - 1.0
    if self.penalty == "hinge":
      penalty = hparams.hinge_weight * jax.nn.relu(excess)
    elif self.penalty == "absolute":
      penalty = hparams.hinge_weight * jnp.abs(excess)
    else:
      penalty = jax.lax.stop_gradient(state.multiplier) * excess
    metrics = {"task_loss": task, "penalty": penalty, "expected_cost": cost,
               "cost_ratio": cost / hparams.limit, "tau": tau,
               "top1": jnp.mean((jnp.argmax(out, -1) == labels).astype(jnp.float32))}
    return task + penalty, (metrics, updates.get("batch_stats", {}))

  def train_step(self, state: GumbelState, batch: dict[str, Array],
                 hparams: HParams) -> tuple[GumbelState, dict[str, Array]]:
    """One step on weights and (outside warm-up and freeze) logits.

    Args:
      state: the search state.
      batch: `{"image": [B, ...], "label": [B]}`.
      hparams: the swept hyper-parameters (arrays: any values, one trace).

    Returns:
      The new state and scalar metrics: loss, task_loss, penalty,
      expected_cost, cost_ratio (to the limit), tau, top1, multiplier,
      arch_on.
    """
    key = jax.random.fold_in(state.key, state.step)
    trainable = {"model": state.params, "arch": state.logits}
    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(
        self.loss, has_aux=True)(trainable, state, batch, hparams, key)
    step = state.step.astype(jnp.float32)
    arch_on = (step >= hparams.warmup_steps) & (step < hparams.freeze_step)
    updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
    params = jax.tree.map(lambda p, u: p - hparams.weight_lr * u, state.params,
                          updates["model"])
    logits = jax.tree.map(lambda p, u: jnp.where(arch_on, p - hparams.arch_lr * u, p),
                          state.logits, updates["arch"])
    arch_state = jax.tree.map(lambda new, old: jnp.where(arch_on, new, old),
                              opt_state.inner_states["arch"],
                              state.opt_state.inner_states["arch"])
    opt_state = opt_state._replace(
        inner_states={**opt_state.inner_states, "arch": arch_state})
    multiplier = state.multiplier
    if self.penalty == "lagrange":
      ascent = jnp.maximum(0.0, multiplier + hparams.dual_lr * (metrics["cost_ratio"] - 1))
      multiplier = jnp.where(arch_on, ascent, multiplier)
    metrics = {**metrics, "loss": loss, "multiplier": multiplier,
               "arch_on": arch_on.astype(jnp.float32)}
    return GumbelState(step=state.step + 1, params=params, batch_stats=batch_stats,
                       logits=logits, opt_state=opt_state, multiplier=multiplier,
                       key=state.key), metrics
