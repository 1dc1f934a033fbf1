"""Shared by the interception tests: a small encoder, variables drawn by numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

TOKENS, DIM, HEADS = 6, 8, 2


class Encoder(nn.Module):
  """Embedding, multi-head attention, an MLP and a head, as a user writes them."""

  @nn.compact
  def __call__(self, x, deterministic=True):
    x = nn.Dense(DIM, name="embed")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(
        nn.LayerNorm(name="ln1")(x), deterministic=deterministic)
    x = x + y
    x = x + nn.Dense(DIM, name="mlp")(nn.gelu(nn.LayerNorm(name="ln2")(x)))
    return nn.Dense(3, name="head")(jnp.mean(x, axis=1))


def random_variables(model, *args, seed=0, **kwargs):
  """Variables of `model` drawn with numpy (no per-shape PRNG compilations).

  Kernels ~ N(0, 1 / fan_in), norm and BN statistics and affine terms near
  their identity, quantizer parameters 0 (uncalibrated ranges).
  """
  shapes = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, **kwargs), *args)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "_quant" in name:
      return np.zeros(s.shape, s.dtype)
    if "kernel" in name:
      fan_in = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 1
      return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(s.dtype)
    noise = 0.1 * rng.normal(size=s.shape)
    base = 1.0 if name.endswith(("['scale']", "['var']")) else 0.0
    return (base + (np.abs(noise) if name.endswith("['var']") else noise)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def strip_quantizers(tree):
  """`tree` without the quantizer parameters the wrapper adds."""
  if not isinstance(tree, dict):
    return tree
  return {k: strip_quantizers(v) for k, v in tree.items()
          if k not in ("act_quant", "weight_quant", "rhs_quant")
          and not (isinstance(v, dict) and set(v) <= {"act_quant", "rhs_quant"})}
