"""A job's default quantizers give logits that do not depend on the batch.

The config's default activation quantizer ('static') holds ranges calibrated
once and then fixed, as a deployed integer model does: an image's logits are
the same at batch 1, at batch 64 and in the padded last batch of an
evaluation. The per-batch 'dynamic' ranges move with the other examples of
the batch, which the same check shows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.nn import layer_table
from haqjax.nn.calibrate import calibrate
from haqjax.policy import Policy
from haqjax.quant import StaticRange
from haqjax.train import steps
from haqjax.train import trainer
from haqjax.train.config import Config

INPUT_SHAPE = (1, 8, 8, 1)  # digits
NUM_IMAGES = 100  # one batch of 64 and a last one of 36 padded to 64
BATCH = 64


def _images(seed: int, n: int) -> np.ndarray:
  # Normalized digits-like images: mostly background, some strokes.
  rng = np.random.default_rng(seed)
  return (rng.uniform(-1.0, 2.5, (n, *INPUT_SHAPE[1:])) * (rng.uniform(size=(n, 8, 8, 1)) < 0.4)
          ).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _setup(act_quantizer: str):
  """A digits CNN as a job builds it, random weights, calibrated on 2 batches."""
  config = Config(mode="qat", dataset="digits", model="digits_cnn", policy="w8a8",
                  **({} if act_quantizer == "default" else {"act_quantizer": act_quantizer}))
  model = trainer.build_model(config, num_classes=10)
  tx = steps.make_optimizer(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.0)
  variables = steps.init_state(jax.random.key(0), model, tx, INPUT_SHAPE).variables()
  names = layer_table(model, INPUT_SHAPE).names
  # Mixed: a different bit-width for each layer's weights and inputs.
  policy = Policy.create(names, w_bits=[8, 3, 5][:len(names)], a_bits=[8, 4, 6][:len(names)])
  variables = calibrate(model, variables, [_images(1, 32), _images(2, 32)], policy)
  return model, variables, policy


def _logits(model, variables, policy, images: np.ndarray, index: int = 0) -> np.ndarray:
  # As `steps.eval_step` applies the model (same `quant` key for a batch index).
  key = jax.random.fold_in(jax.random.key(steps.EVAL_SEED), index)
  return np.asarray(_apply(model, variables, images, policy, key))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, images, policy, key):
  return model.apply(variables, images, policy=policy, train=False, rngs={"quant": key})


def _batched_logits(model, variables, policy, images: np.ndarray):
  """Logits of `images` at batch 1, and at batch 64 with a padded last batch
  (zero images, mask 0, as `haqjax.data.batches` pads an evaluation)."""
  single = np.concatenate([_logits(model, variables, policy, images[i:i + 1])
                           for i in range(len(images))])
  padded = np.zeros((2 * BATCH, *images.shape[1:]), np.float32)
  padded[:len(images)] = images
  full = _logits(model, variables, policy, padded[:BATCH])
  last = _logits(model, variables, policy, padded[BATCH:], index=1)
  return single, full, last


def test_default_act_quantizer_is_static():
  assert Config().act_quantizer == "static"
  model, variables, _ = _setup("default")
  assert isinstance(model.quant_scheme.act, StaticRange)
  ranges = [path for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
            if any(getattr(k, "key", None) == "act_quant" for k in path)]
  assert ranges  # calibrated parameters, one range per quantized layer input


# Float rounding of logits, relative to their largest magnitude.
_ROUNDING = 1e-6


def _scale(logits):
  return float(np.abs(logits).max())


def test_static_ranges_give_the_same_logits_at_any_batch_size():
  model, variables, policy = _setup("default")
  images = _images(3, NUM_IMAGES)
  single, full, last = _batched_logits(model, variables, policy, images)
  # Equal up to float rounding: XLA may order a convolution's sums by batch
  # size (it does with its backend optimisations off, as the tests compile).
  np.testing.assert_allclose(full, single[:BATCH], rtol=0, atol=_ROUNDING * _scale(single))
  np.testing.assert_allclose(last[:NUM_IMAGES - BATCH], single[BATCH:], rtol=0,
                             atol=_ROUNDING * _scale(single))

  # The evaluation step's masked sums of the padded batch count only its real
  # examples, with the same predictions.
  labels = np.arange(2 * BATCH) % 10
  mask = (np.arange(BATCH) < NUM_IMAGES - BATCH).astype(np.float32)
  padded = np.zeros((BATCH, *images.shape[1:]), np.float32)
  padded[:NUM_IMAGES - BATCH] = images[BATCH:]
  sums = steps.eval_step(model, variables, {"image": jnp.asarray(padded),
                                            "label": jnp.asarray(labels[BATCH:]),
                                            "mask": jnp.asarray(mask)}, policy, 1)
  want_top1 = np.sum(np.argmax(single[BATCH:], -1) == labels[BATCH:NUM_IMAGES])
  assert float(sums["count"]) == NUM_IMAGES - BATCH
  assert float(sums["top1"]) == want_top1


def test_dynamic_ranges_move_with_the_batch():
  # The same check fails with per-batch ranges: it can tell the two apart.
  model, variables, policy = _setup("dynamic")
  single, full, last = _batched_logits(model, variables, policy, _images(3, NUM_IMAGES))
  assert np.abs(full - single[:BATCH]).max() > 100 * _ROUNDING * _scale(single)
  assert not np.array_equal(last[:NUM_IMAGES - BATCH], single[BATCH:])


def test_minmax_is_no_longer_an_activation_quantizer():
  with pytest.raises(ValueError, match="act_quantizer='minmax' is not allowed; allowed: static, "
                     "dynamic"):
    Config(act_quantizer="minmax")
