"""Tests of the divergence checks and of a diverging training run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax.train import Config
from haqjax.train import train_and_evaluate
from haqjax.train import divergence


def test_finite_losses_pass():
  divergence.check_finite(2.5, 10, None)
  divergence.check_finite(np.array([2.5, 1.0, 0.5], np.float32), 10, "/ckpt/8")
  divergence.check_finite([], 10, None)  # An empty window.


@pytest.mark.parametrize("losses, step, first", [
    ([1.0, np.nan, np.nan], 12, 11),
    ([1.0, 2.0, np.inf], 12, 12),
    ([np.nan], 3, 3),
])
def test_first_non_finite_step_is_named(losses, step, first):
  with pytest.raises(divergence.Diverged, match=f"loss is .* at step {first}; the last good "
                     "checkpoint /w/checkpoints/8 is kept"):
    divergence.check_finite(np.asarray(losses, np.float32), step, "/w/checkpoints/8")


def test_diverged_is_a_value_error_and_says_when_no_checkpoint_exists():
  with pytest.raises(ValueError, match="at step 7; no checkpoint was written before it"):
    divergence.check_finite(jnp.float32(jnp.nan), 7, None)


def test_state_check_names_the_leaf_and_skips_integers():
  state = {"params": {"w": jnp.ones((3,)), "b": jnp.zeros((2,))},
           "count": jnp.int32(4), "key": jax.random.key(0)}
  assert bool(divergence.all_finite(state))
  divergence.check_state_finite(state, 5, None)
  state["params"]["w"] = jnp.array([1.0, jnp.inf, 0.0])
  assert not bool(divergence.all_finite(state))
  with pytest.raises(divergence.Diverged,
                     match=r"not finite after step 5 \(params/w\); the last good checkpoint c"):
    divergence.check_state_finite(state, 5, "c")


def test_nan_learning_rate_stops_at_step_2(tmp_path):
  config = Config(dataset="digits", model="digits_cnn", val_size=200, epochs=2,
                  batch_size=64, eval_batch_size=200, learning_rate=float("nan"),
                  progress=False, tensorboard=False, data_dir=str(tmp_path / "data"))
  # Step 1's loss is on the initial parameters; its NaN update shows at step 2.
  with pytest.raises(divergence.Diverged,
                     match="loss is nan at step 2; no checkpoint was written before it"):
    train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "results.json").exists()
  assert not [d for d in (tmp_path / "run" / "checkpoints").iterdir() if d.name.isdigit()]


def test_metrics_window_names_the_first_bad_step_and_metric():
  window = [{"loss": 2.0, "grad_norm": 1.0}, {"loss": 3.0, "grad_norm": np.inf},
            {"loss": np.nan, "grad_norm": np.nan}]
  divergence.check_metrics(window[:1], 8, None)
  with pytest.raises(divergence.Diverged, match="grad_norm is inf at step 9;"):
    divergence.check_metrics(window, 10, None)
