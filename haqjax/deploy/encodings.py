"""`encodings.json`: a graph's quantization encodings in AIMET's format.

AIMET's encoding file (format version 0.5.0, see `References`) maps tensor
names to lists of encodings, one per tensor or one per output channel::

    {"version": "0.5.0",
     "activation_encodings": {"layer1_0/conv1:in": [{"bitwidth": 4, ...}]},
     "param_encodings": {"layer1_0/conv1/kernel": [{...}, {...}, ...]}}

    encoding = {"dtype": "int", "bitwidth": b, "is_symmetric": "True"|"False",
                "scale": s, "offset": o, "min": o * s,
                "max": (o + 2^b - 1) * s}

AIMET (and Qualcomm's QNN, which reads the file) describe every grid as the
unsigned one: `real = (q + offset) * scale` for `q` in `[0, 2^b - 1]`, so
`offset = round(min / scale) <= 0`. A haqjax encoding
`real = (c - zero_point) * scale` on the grid `[qmin, qmax]` maps by
`q = c + 2^(b-1)` (signed grids) or `q = c` (unsigned), hence::

    offset = -zero_point                    unsigned grid
    offset = -zero_point - 2^(b-1)          signed grid (two's complement)

i.e. `offset` is minus the zero point on the unsigned grid: a symmetric
8-bit weight has offset -128, a ReLU output on the unsigned grid with zero
point 0 has offset 0, as in AIMET's files. `min` and `max` are the ends of
the full `2^b`-code grid (a narrow-range grid does not use its lowest code).

Activation encodings are listed for every tensor stored as codes (bits <= 8),
under the graph's tensor names, which the ONNX export gives its dequantized
tensors. int32 tensors (accumulators, residual streams) have none: they are
the bias domain of the integer kernels. Param encodings are listed for the
kernel of every integer layer (`<layer>/kernel`, one per output channel,
the name of its dequantized weight in `model.onnx`); a floating-point
layer's kernel is `{"dtype": "float", "bitwidth": 32}`.

References:
  AIMET, "Encoding Format Specification", versions 0.4.0 to 0.6.1,
  github.com/quic/aimet, Docs/api_docs/quantization_encoding_specification.rst
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from haqjax.deploy.graph import Encoding
from haqjax.deploy.graph import Graph
from haqjax.deploy.packing import weight_bits
from haqjax.io import write_json

VERSION = "0.5.0"
INTEGER_LAYERS = ("conv", "dense")
FLOAT_LAYERS = ("float_conv", "float_dense")


def aimet_offset(bits: int, signed: bool, zero_point: int) -> int:
  """AIMET's offset of a haqjax grid: minus the zero point on the unsigned grid."""
  return -int(zero_point) - ((1 << (bits - 1)) if signed else 0)


def aimet_encoding(bits: int, signed: bool, scale: float, zero_point: int,
                   symmetric: bool) -> dict[str, Any]:
  """One AIMET encoding (a dict of its fields) of a per-tensor grid."""
  offset = aimet_offset(bits, signed, zero_point)
  scale = float(np.float32(scale))
  return {"dtype": "int", "bitwidth": int(bits), "is_symmetric": str(bool(symmetric)),
          "scale": scale, "offset": offset, "min": offset * scale,
          "max": (offset + (1 << bits) - 1) * scale}


def _tensor_encodings(enc: Encoding) -> list[dict[str, Any]]:
  scales = np.atleast_1d(enc.scale)
  return [aimet_encoding(enc.bits, enc.signed, s, enc.zero_point, enc.symmetric)
          for s in scales]


def graph_encodings(graph: Graph) -> dict[str, Any]:
  """The AIMET encodings (version 0.5.0) of `graph`, as a JSON-ready dict."""
  activations, params = {}, {}
  for node in graph.nodes:
    enc = node.encoding
    if enc is not None and not enc.is_wide:
      activations[node.name] = _tensor_encodings(enc)
    if node.op in INTEGER_LAYERS:
      bits = weight_bits(graph, node)
      params[f"{node.name}/kernel"] = [
          aimet_encoding(bits, True, s, 0, True) for s in node.arrays["weight_scale"]]
    elif node.op in FLOAT_LAYERS:
      params[f"{node.name}/kernel"] = [{"dtype": "float", "bitwidth": 32}]
  return {"version": VERSION, "activation_encodings": activations,
          "param_encodings": params}


def save_encodings(path: str | os.PathLike, graph: Graph) -> int:
  """Writes `graph_encodings(graph)` to `path` atomically; returns its size."""
  write_json(path, graph_encodings(graph))
  return os.path.getsize(path)
