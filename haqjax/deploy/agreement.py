"""How the integer graph agrees with the fake-quantized model, and its accuracy.

* `compare_codes(graph, model, variables, x)`: for every layer with integer
  input codes, the codes the engine computed against the codes of the
  fake-quantized model's input to that layer (`affine.quantize` of its
  float input with the layer's spec), counted as equal, one step apart and
  further apart. The engine requantizes exact int32 accumulators with a
  fixed-point multiplier (relative error below 2^-30), where the fake-quant
  model rounds float32 sums; the two can land on either side of a rounding
  boundary, which moves a code by one step, and never by more unless an
  earlier difference accumulates.
* `compare_logits`: the fraction of identical predictions and the largest
  logit difference.
* `evaluate(graph, split)`: top-1 accuracy of the integer graph over a
  dataset split.
"""

from __future__ import annotations

from collections.abc import Iterable
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from haqjax import data as data_lib
from haqjax.deploy import capture as capture_lib
from haqjax.deploy import engine
from haqjax.deploy import quantizers
from haqjax.deploy.graph import Graph
from haqjax.nn.layers import QuantizedLayer
from haqjax.nn.layers import layer_name
from haqjax.quant import affine
from haqjax.treeutil import get_path
from haqjax.typing import Array, PyTree


class CodeAgreement(NamedTuple):
  """Codes of one layer's input: how many, and how many differ by 1 and by more."""
  total: int
  off_by_one: int
  off_by_more: int


class LogitAgreement(NamedTuple):
  """Predictions that agree (fraction and count) and the largest logit difference."""
  fraction: float
  disagreements: int
  max_abs_diff: float


def fake_quant_run(model: nn.Module, variables: PyTree, x: Array, policy: Any
                   ) -> tuple[Array, dict[str, Array]]:
  """`model.apply(variables, x, policy)` and the float input of every layer.

  Compiled once per model and shapes (the policy is data).
  """
  return _recorder(model)(variables, x, policy)


@functools.lru_cache(maxsize=8)
def _recorder(model: nn.Module):
  """A jitted `(variables, x, policy) -> (logits, {layer: input})` for `model`."""

  def record(variables, x, policy):
    captured: dict[str, Array] = {}

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, QuantizedLayer) and context.method_name == "__call__":
        captured.setdefault(layer_name(context.module), args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      logits = model.apply(variables, x, policy=policy)
    return logits, captured

  return jax.jit(record)


def compare_codes(graph: Graph, model: nn.Module, variables: PyTree, x: Array, *,
                  forced: bool = True) -> dict[str, CodeAgreement]:
  """Per layer, the engine's input codes against the fake-quantized model's.

  Args:
    graph: the integer graph built from `model`, `variables` and
      `graph.policy`.
    model, variables: the model and its (calibrated) variables.
    x: an input batch.
    forced: feed every layer the fake-quantized model's input codes, so that
      each layer's codes are compared on equal inputs and a difference is
      that layer's rounding alone (at most one step); False: run the engine
      end to end, where an early difference propagates.

  Returns:
    `{layer: CodeAgreement}` for every layer whose input is integer codes, in
    graph order.
  """
  _, inputs = fake_quant_run(model, variables, x, graph.policy)
  infos = {op.attrs["info"].name: op.attrs["info"]
           for op in capture_lib.capture(model, variables, x[:1]).ops if op.kind == "layer"}
  wanted = {}
  for node in graph.nodes:
    if node.op not in ("conv", "dense", "float_conv", "float_dense"):
      continue
    source = node.inputs[0]
    if source.endswith(":in_float"):  # A float layer on dequantized codes.
      source = graph.node(source).inputs[0]
    enc = graph.encoding(source)
    if enc is None or enc.is_wide:
      continue
    info = infos[node.name]
    params = get_path(variables["params"], info.path)["act_quant"]
    a_bits = int(graph.policy.bits_for(node.name)[1])
    _, _, spec = quantizers.act_encoding(node.name, info.quantizers[1], params, a_bits,
                                         info.in_shape)
    wanted[node.name] = (source, affine.quantize(
        jnp.asarray(inputs[node.name]), jnp.float32(enc.scale), jnp.float32(enc.zero_point),
        a_bits, spec))
  if forced:
    tensors = engine.run_forced(graph, x, {s: w for s, w in wanted.values()})
  else:
    _, tensors = engine.run(graph, x, intermediates=True)
  out = {}
  for name, (source, want) in wanted.items():
    got = tensors[source]
    diff = np.abs(np.asarray(got, np.int64) - np.asarray(want, np.int64))
    out[name] = CodeAgreement(int(diff.size), int(np.sum(diff == 1)), int(np.sum(diff > 1)))
  return out


def compare_logits(graph: Graph, model: nn.Module, variables: PyTree, x: Array
                   ) -> LogitAgreement:
  """Predictions of the integer graph against the fake-quantized model's."""
  ours = np.asarray(engine.run(graph, x))
  theirs = np.asarray(fake_quant_run(model, variables, x, graph.policy)[0])
  same = np.argmax(ours, -1) == np.argmax(theirs, -1)
  return LogitAgreement(float(np.mean(same)), int(np.sum(~same)),
                        float(np.max(np.abs(ours - theirs))))


def accuracy(graph: Graph, batches: Iterable[Any]) -> float:
  """Top-1 of the integer graph over batches of `{"image", "label"[, "mask"]}`."""
  correct = total = 0.0
  for batch in batches:
    logits = np.asarray(engine.run(graph, batch["image"]))
    mask = np.asarray(batch.get("mask", np.ones(len(logits))), np.float64)
    correct += float(np.sum((np.argmax(logits, -1) == np.asarray(batch["label"])) * mask))
    total += float(np.sum(mask))
  if not total:
    raise ValueError("evaluate: no examples; allowed: a split with examples")
  return correct / total


def evaluate(graph: Graph, split: data_lib.Split, batch_size: int = 256) -> float:
  """Top-1 accuracy of the integer graph on `split` (every example, in order)."""
  return accuracy(graph, data_lib.batches(split, batch_size=batch_size, shuffle=False,
                                          drop_remainder=False))
