"""Agreement of a cost model with a HAQ-format lookup table, and the BISMO fit.

HAQ's latency search sums `T[l, w-1, a-1]` over layers. A model that stands in
for such a table must rank configurations alike and match the sums that the
budget constrains; `table_errors` reports exactly those numbers, and
`fit_bismo` is the small offline search that produced the `bismo-cloud`
preset's parameters. `holdout` fits on some layers and scores the others, the
out-of-sample check of such a fit.

References:
  K. Wang, Z. Liu, Y. Lin, J. Lin, S. Han, "HAQ: Hardware-Aware Automated
  Quantization with Mixed Precision", CVPR 2019.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from haqjax.hardware import bismo as bismo_lib
from haqjax.hardware.layers import Layers

UNIFORM_BITS = (4, 5, 6, 8)


def _ranks(x: np.ndarray) -> np.ndarray:
  """Average ranks (ties share the mean rank), as Spearman's rho uses."""
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x), dtype=np.float64)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation of two equally long arrays."""
  rx = _ranks(np.asarray(x, np.float64).ravel())
  ry = _ranks(np.asarray(y, np.float64).ravel())
  return float(np.corrcoef(rx, ry)[0, 1])


def table_errors(predicted: Any, table: Any,
                 uniform_bits: Sequence[int] = UNIFORM_BITS) -> dict[str, Any]:
  """How well a predicted `[L, 8, 8]` tensor matches a HAQ table.

  Args:
    predicted: model costs `[L, 8, 8]`, indexed `[l, w-1, a-1]`.
    table: the reference table, same shape.
    uniform_bits: uniform WbAb policies whose network sums are compared.

  Returns:
    `mean_abs_pct_error` over all entries (equal to the mean over layers of
    each layer's mean), `per_layer_mean_abs_pct_error` `[L]`, `spearman` over
    all entries, and `network_pct_error` {'W4A4': signed % error, ...}.
  """
  p = np.asarray(predicted, np.float64)
  t = np.asarray(table, np.float64)
  if p.shape != t.shape:
    raise ValueError(f"predicted has shape {p.shape}; the table has {t.shape}")
  rel = np.abs(p - t) / t
  net = {f"W{b}A{b}": float(100 * (p[:, b - 1, b - 1].sum() / t[:, b - 1, b - 1].sum() - 1))
         for b in uniform_bits}
  return {
      "mean_abs_pct_error": float(100 * rel.mean()),
      "per_layer_mean_abs_pct_error": (100 * rel.mean(axis=(1, 2))).tolist(),
      "spearman": spearman(p, t),
      "network_pct_error": net,
  }


def fit_score(errors: dict[str, Any]) -> float:
  """`fit_bismo`'s objective (lower is better) from `table_errors`' output.

  The mean absolute % error over all entries plus the worst network-level %
  error at the uniform policies: the first weighs every entry of the table, the
  second the network sums that a budget constrains.
  """
  return errors["mean_abs_pct_error"] + max(
      abs(v) for v in errors["network_pct_error"].values())


def bismo_tensor(target: bismo_lib.Bismo, layers: Layers) -> np.ndarray:
  """BISMO cycles `[L, 8, 8]` for bits 1..8 (no jit; used by the fit)."""
  b = jnp.arange(1.0, 9.0)
  cycles = target.layer_cost(layers, b[:, None, None], b[None, :, None])["cycles"]
  return np.asarray(jnp.transpose(cycles, (2, 0, 1)))  # [W, A, L] -> [L, W, A]


def _unit_stages(layers: Layers, dm: int, dn: int, dk: int) -> list[np.ndarray]:
  """BISMO's stages `[L, 8, 8]` (float64) at one bit per cycle on each port.

  The fetch and result stages are bits over a port width (see
  `haqjax.hardware.bismo`), so a port of `p` bits divides them by `p`; the
  fit evaluates its port and overhead grid from these four tensors.
  """
  unit = bismo_lib.Bismo(name="bismo-fit", dm=dm, dn=dn, dk=dk, act_fetch_bits=1.0,
                         weight_fetch_bits=1.0, result_bits=1.0)
  b = jnp.arange(1.0, 9.0)
  s = unit.stages(layers, b[:, None, None], b[None, :, None])
  shape = (8, 8, len(layers))
  return [np.asarray(jnp.transpose(jnp.broadcast_to(s[k], shape), (2, 0, 1)), np.float64)
          for k in ("execute", "fetch_a", "fetch_w", "result")]


def check_subset(subset: Sequence[int] | None, n: int) -> np.ndarray:
  """Indices of the layers to fit on: all `n` layers when `subset` is None."""
  if subset is None:
    return np.arange(n)
  idx = np.asarray(subset)
  if (idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer)
      or (idx < 0).any() or (idx >= n).any() or np.unique(idx).size != idx.size):
    raise ValueError(f"subset is {subset!r}; allowed: distinct layer indices in "
                     f"0..{n - 1}, at least one")
  return idx


def fit_bismo(layers: Layers, table: Any, *,
              subset: Sequence[int] | None = None,
              dims: Sequence[int] = (8, 16, 32),
              dks: Sequence[int] = (128, 256, 512),
              weight_ports: Sequence[float] = (8.0, 16.0, 32.0),
              result_ports: Sequence[float] = (1024.0, 2048.0, 4096.0),
              overheads: Sequence[float] = (0.0, 1000.0, 2000.0, 3000.0),
              ) -> tuple[bismo_lib.Bismo, dict]:
  """Grid search of BISMO parameters against a HAQ table.

  The activation port is searched at `Dk / 2`, `Dk` and `2 Dk` bits. The
  objective is `fit_score` over the layers of `subset` (their entries and
  their network sums), so that the layers left out can score the fit.

  Args:
    layers: the table's network at the table's batch size.
    table: `[L, 8, 8]` reference cycles.
    subset: indices of the layers to fit on (default: all).
    dims, dks, weight_ports, result_ports, overheads: the grid (the defaults
      reproduce the `bismo-cloud` preset from HAQ's table).

  Returns:
    `(best target, its table_errors on the subset)`.

  Raises:
    ValueError: `subset` holds no layer, repeats one or is out of range.
  """
  idx = check_subset(subset, len(layers))
  ref = np.asarray(table)[idx]
  best = None
  for dm, dn, dk in itertools.product(dims, dims, dks):
    ex, fa, fw, rs = (x[idx] for x in _unit_stages(layers, dm, dn, dk))
    for act, wp, rp, oh in itertools.product(
        (dk / 2, dk, 2 * dk), weight_ports, result_ports, overheads):
      pred = np.maximum(np.maximum(ex, fa / act), np.maximum(fw / wp, rs / rp)) + oh
      score = fit_score(table_errors(pred, ref))
      if best is None or score < best[0]:
        best = (score, (dm, dn, dk, act, wp, rp, oh))
  dm, dn, dk, act, wp, rp, oh = best[1]
  t = bismo_lib.Bismo(name="bismo-fit", dm=dm, dn=dn, dk=dk,
                      act_fetch_bits=float(act), weight_fetch_bits=wp,
                      result_bits=rp, overhead_cycles=oh)
  return t, table_errors(bismo_tensor(t, layers)[idx], ref)


def holdout(layers: Layers, table: Any, train: Sequence[int],
            **grid: Any) -> tuple[bismo_lib.Bismo, dict, dict]:
  """Fits BISMO on the layers `train` and scores it on the others.

  Args:
    layers: the table's network at the table's batch size.
    table: `[L, 8, 8]` reference cycles.
    train: indices of the layers to fit on; the rest are held out.
    **grid: `fit_bismo`'s grid arguments.

  Returns:
    `(fitted target, table_errors on train, table_errors on the held-out
    layers)`.

  Raises:
    ValueError: a bad `train`, or one that leaves no layer out.
  """
  idx = check_subset(train, len(layers))
  test = np.setdiff1d(np.arange(len(layers)), idx)
  if not test.size:
    raise ValueError("train holds every layer; allowed: a subset that leaves "
                     "at least one layer out")
  target, fit_err = fit_bismo(layers, table, subset=idx, **grid)
  pred = bismo_tensor(target, layers)
  return target, fit_err, table_errors(pred[test], np.asarray(table)[test])
