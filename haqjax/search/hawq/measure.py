"""One sensitivity pass and its file, `sensitivity.json`.

`sensitivity_pass` runs the pieces of `haqjax.search.hawq.sensitivity` in
order: record each layer's inputs on the batches, estimate the traces,
measure the quantization errors at the candidate bits, build `Omega`.
`write_sensitivity` / `read_sensitivity` store the result as JSON (written
atomically), so a job that stops after the pass does not redo it:

    {"format": "haqjax.sensitivity/1",
     "layers": ["stem", ...],
     "table_bits": [1, ..., 8, 32],
     "w_bits": [2, ..., 8], "a_bits": [2, ..., 8],
     "weight_traces": [...], "activation_traces": [...],
     "weight_trace_errors": [...], "activation_trace_errors": [...],  # standard errors
     "weight_counts": [...], "activation_counts": [...],
     "weight_mse": [[...]], "activation_mse": [[...]],      # [L, 9]
     "omega": [[[...]]],                                      # [L, 9, 9]
     "estimator": {"iterations", "probes", "converged", "seconds",
                   "granularity", ...},
     # granularity 'channel' only: per layer, the traces per channel
     "weight_channel_traces": [[...]], "activation_channel_traces": [[...]]}

With `granularity='channel'` the errors are the trace-weighted ones
(`sensitivity`'s module doc).

Entries that are `+inf` in memory (bits that were not candidates) are
`null` in the file.
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from haqjax import io as haq_io
from haqjax.hardware.budget import TABLE_BITS
from haqjax.search.hawq import errors
from haqjax.search.hawq import sensitivity as sens
from haqjax.search.hawq.config import GRANULARITIES
from haqjax.typing import PRNGKey
from haqjax.typing import PyTree

FORMAT = "haqjax.sensitivity/1"


@dataclasses.dataclass(frozen=True)
class Sensitivity:
  """A model's per-layer sensitivities and its `Omega` table.

  Attributes:
    traces: the Hessian traces (`sensitivity.Traces`).
    w_bits: candidate weight bit-widths measured.
    a_bits: candidate activation bit-widths measured.
    weight_mse: `[L, 9]` per-element squared weight error over `TABLE_BITS`
      (trace-weighted over channels with `granularity='channel'`).
    activation_mse: `[L, 9]` the same for each layer's input.
    omega: `[L, 9, 9]` the perturbation table.
    seconds: wall time of the whole pass (traces and errors).
    granularity: 'channel' or 'tensor' (HAWQ's isotropic noise per tensor;
      a file without the field is one).
  """
  traces: sens.Traces
  w_bits: tuple[int, ...]
  a_bits: tuple[int, ...]
  weight_mse: np.ndarray
  activation_mse: np.ndarray
  omega: np.ndarray
  seconds: float
  granularity: str = "tensor"

  @property
  def names(self) -> tuple[str, ...]:
    return self.traces.names

  def to_dict(self) -> dict[str, Any]:
    """The JSON form (see the module docstring)."""
    t = self.traces
    channels = {} if t.weight_channels is None else {
        "weight_channel_traces": [c.tolist() for c in t.weight_channels],
        "activation_channel_traces": [c.tolist() for c in t.activation_channels]}
    return {
        "format": FORMAT, "layers": list(t.names), "table_bits": list(TABLE_BITS),
        "w_bits": list(self.w_bits), "a_bits": list(self.a_bits),
        "weight_traces": t.weight.tolist(), "activation_traces": t.activation.tolist(),
        "weight_trace_errors": None if t.weight_error is None else _nulls(t.weight_error),
        "activation_trace_errors": (None if t.activation_error is None
                                    else _nulls(t.activation_error)),
        "weight_counts": t.weight_count.tolist(),
        "activation_counts": t.activation_count.tolist(),
        "weight_mse": _nulls(self.weight_mse), "activation_mse": _nulls(self.activation_mse),
        "omega": _nulls(self.omega),
        "estimator": {"curvature": t.curvature, "iterations": t.iterations,
                      "probes": t.probes,
                      "converged": t.converged, "trace_seconds": t.seconds,
                      "seconds": self.seconds, "granularity": self.granularity},
        **channels,
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "sensitivity") -> Sensitivity:
    """Reads the JSON form."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
      raise ValueError(f"{source}: expected an object of format {FORMAT!r}")
    if list(d["table_bits"]) != list(TABLE_BITS):
      raise ValueError(f"{source}: table_bits {d['table_bits']}; allowed: {list(TABLE_BITS)}")
    est = d["estimator"]
    traces = sens.Traces(
        names=tuple(d["layers"]), weight=np.asarray(d["weight_traces"], np.float64),
        activation=np.asarray(d["activation_traces"], np.float64),
        weight_count=np.asarray(d["weight_counts"], np.int64),
        activation_count=np.asarray(d["activation_counts"], np.int64),
        iterations=int(est["iterations"]), probes=int(est["probes"]),
        converged=bool(est["converged"]), seconds=float(est["trace_seconds"]),
        curvature=str(est.get("curvature", "hessian")),
        weight_error=_optional(d.get("weight_trace_errors")),
        activation_error=_optional(d.get("activation_trace_errors")),
        weight_channels=_channels(d.get("weight_channel_traces")),
        activation_channels=_channels(d.get("activation_channel_traces")))
    return cls(traces=traces, w_bits=tuple(d["w_bits"]), a_bits=tuple(d["a_bits"]),
               weight_mse=_infs(d["weight_mse"]), activation_mse=_infs(d["activation_mse"]),
               omega=_infs(d["omega"]), seconds=float(est["seconds"]),
               granularity=str(est.get("granularity", "tensor")))


def _nulls(a: np.ndarray) -> Any:
  """Nested lists with `None` for non-finite entries (JSON has no inf)."""
  return np.where(np.isfinite(a), a, None).tolist()


def _optional(x: Any) -> np.ndarray | None:
  """A standard-error list (`None` entries: not known, `nan`), or None."""
  return None if x is None else np.asarray(
      np.where(np.equal(np.asarray(x, object), None), np.nan, x), np.float64)


def _channels(x: Any) -> tuple[np.ndarray, ...] | None:
  return None if x is None else tuple(np.asarray(c, np.float64) for c in x)


def _infs(x: Any) -> np.ndarray:
  return np.asarray(np.where(np.equal(np.asarray(x, object), None), np.inf, x), np.float64)


def sensitivity_pass(key: PRNGKey, model: nn.Module, variables: PyTree,
                     batches: Sequence[PyTree], *, w_bits: Sequence[int],
                     a_bits: Sequence[int], probes: int, tol: float,
                     max_iterations: int, label_smoothing: float = 0.0,
                     curvature: str = "hessian", granularity: str = "channel"
                     ) -> Sensitivity:
  """The sensitivity pass on `batches` (see `sensitivity.hessian_traces`).

  Args:
    key: split between the trace estimator and stochastic quantizers.
    model: the model with its quantizers (run in floating point for the traces).
    variables: FP32 weights (and quantizer parameters, recalibrated per bits).
    batches: training batches of one shape.
    w_bits: weight bit-widths to measure (candidates and fixed layers' bits).
    a_bits: activation bit-widths to measure.
    probes: Hutchinson probes per iteration and batch.
    tol: the estimate ends once every trace's standard error is at most
      `tol` times its magnitude.
    max_iterations: cap on the estimator's iterations.
    label_smoothing: the training loss's.
    curvature: 'hessian' or 'gauss_newton' (`sensitivity.hessian_traces`).
    granularity: 'channel' (traces and errors per channel; `sensitivity`'s
      module doc) or 'tensor' (HAWQ's: one trace and one error per tensor).
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r}; allowed: {', '.join(GRANULARITIES)}")
  channels = granularity == "channel"
  t0 = time.perf_counter()
  batches = list(batches)
  trace_key, error_key = jax.random.split(key)
  recorded = sens.record(model, variables, batches)
  # The errors do not depend on the traces: they are compiled and measured
  # in a second thread while the estimator runs (XLA compiles in one
  # thread; the two compilations overlap).
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    measured = pool.submit(errors.quantization_mse, error_key, variables, recorded,
                         num_batches=len(batches), w_bits=w_bits, a_bits=a_bits,
                         channels=channels)
    traces = sens.hessian_traces(trace_key, model, variables, batches, probes=probes,
                                 tol=tol, max_iterations=max_iterations,
                                 label_smoothing=label_smoothing, recorded=recorded,
                                 curvature=curvature, channels=channels)
    w_mse, a_mse = measured.result()
  if channels:
    w_mse = errors.channel_weighted(w_mse, traces.weight_channels)
    a_mse = errors.channel_weighted(a_mse, traces.activation_channels)
  return Sensitivity(traces=traces, w_bits=tuple(int(b) for b in w_bits),
                     a_bits=tuple(int(b) for b in a_bits), weight_mse=w_mse,
                     activation_mse=a_mse, omega=sens.perturbation_table(traces, w_mse, a_mse),
                     seconds=time.perf_counter() - t0, granularity=granularity)


def write_sensitivity(path: str | os.PathLike, sensitivity: Sensitivity) -> None:
  """Writes `sensitivity.json` atomically."""
  haq_io.write_json(path, sensitivity.to_dict())


def read_sensitivity(path: str | os.PathLike) -> Sensitivity:
  """The `Sensitivity` written at `path`."""
  with open(path) as f:
    return Sensitivity.from_dict(json.load(f), source=os.fspath(path))
