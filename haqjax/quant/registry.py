"""Quantizers by name, for configs and command-line flags.

Weight quantizers: 'minmax' (symmetric per-channel, plain STE), 'mse'
(per-channel range calibrated to the least squared error, then fixed; it
clips, so the clipped STE gives clipped weights no gradient), 'lsq'
(per-channel learned step), 'lsq_mse' (LSQ, initial step of least squared
error), 'kmeans' (codebook of 2^b centroids, HAQ's size
mode), 'binary' (XNOR-Net), 'ternary' (TWN), 'fp8_e4m3', 'fp8_e5m2'.

Activation quantizers: 'static' (min-max range calibrated on a few batches,
then fixed: the default of jobs, since a deployed integer model holds fixed
ranges), 'dynamic' (range of each batch, unsigned after ReLU: outputs depend
on the other examples of the batch), 'percentile', 'mse', 'kl' (calibrated
ranges), 'lsq', 'lsq_mse', 'lsq+' (learned step; initial step of least
squared error; and offset), 'pact' (learned clip),
'haq' (HAQ's learned clip, signed or unsigned), 'fp8_e4m3', 'fp8_e5m2'.
"""

from __future__ import annotations

from collections.abc import Callable

from haqjax.quant import affine
from haqjax.quant.base import Quantizer
from haqjax.quant.learned import HAQActivation
from haqjax.quant.learned import LSQ
from haqjax.quant.learned import PACT
from haqjax.quant.uniform import MinMaxActivation
from haqjax.quant.uniform import MinMaxWeight
from haqjax.quant.uniform import StaticRange


def _kmeans() -> Quantizer:
  from haqjax.quant.codebook import KMeansWeight  # pylint: disable=g-import-not-at-top
  return KMeansWeight()


def _binary() -> Quantizer:
  from haqjax.quant.lowbit import BinaryWeight  # pylint: disable=g-import-not-at-top
  return BinaryWeight()


def _ternary() -> Quantizer:
  from haqjax.quant.lowbit import TernaryWeight  # pylint: disable=g-import-not-at-top
  return TernaryWeight()


def _fp8(fmt: str, channel_axis: int | None) -> Callable[[], Quantizer]:
  def make() -> Quantizer:
    from haqjax.quant.fp8 import FP8  # pylint: disable=g-import-not-at-top
    return FP8(fmt=fmt, channel_axis=channel_axis)
  return make


_PER_CHANNEL = affine.AffineSpec(channel_axis=-1)

_WEIGHT: dict[str, Callable[[], Quantizer]] = {
    "minmax": MinMaxWeight,
    "mse": lambda: StaticRange(spec=_PER_CHANNEL, sign="signed", method="mse",
                               estimator="clipped"),
    "lsq": lambda: LSQ(sign="signed", channel_axis=-1),
    "lsq_mse": lambda: LSQ(sign="signed", channel_axis=-1, step_init="mse"),
    "kmeans": _kmeans,
    "binary": _binary,
    "ternary": _ternary,
    "fp8_e4m3": _fp8("e4m3", -1),
    "fp8_e5m2": _fp8("e5m2", -1),
}

_ACT: dict[str, Callable[[], Quantizer]] = {
    "static": lambda: StaticRange(method="minmax"),
    "dynamic": MinMaxActivation,
    "percentile": lambda: StaticRange(method="percentile"),
    "mse": lambda: StaticRange(method="mse"),
    "kl": lambda: StaticRange(method="kl"),
    "lsq": lambda: LSQ(sign="auto", batch_axis=0),
    "lsq_mse": lambda: LSQ(sign="auto", batch_axis=0, step_init="mse"),
    "lsq+": lambda: LSQ(sign="auto", batch_axis=0, learn_offset=True),
    "pact": lambda: PACT(sign="auto"),
    "haq": HAQActivation,
    "fp8_e4m3": _fp8("e4m3", None),
    "fp8_e5m2": _fp8("e5m2", None),
}

WEIGHT_QUANTIZERS = tuple(_WEIGHT)
ACT_QUANTIZERS = tuple(_ACT)


def weight_quantizer(name: str) -> Quantizer:
  """The weight quantizer called `name` (see the module docstring)."""
  if name not in _WEIGHT:
    raise ValueError(f"weight_quantizer is {name!r}; allowed: {', '.join(_WEIGHT)}")
  return _WEIGHT[name]()


def act_quantizer(name: str) -> Quantizer:
  """The activation quantizer called `name` (see the module docstring)."""
  if name not in _ACT:
    raise ValueError(f"act_quantizer is {name!r}; allowed: {', '.join(_ACT)}")
  return _ACT[name]()
