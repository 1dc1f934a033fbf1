"""Named hardware presets and `get_target(name)`.

  * 'bismo-edge': BISMO on a Zynq-7020 (PYNQ-Z1), batch 1 (HAQ's edge setting).
  * 'bismo-cloud': BISMO on a VU9P, batch 16, calibrated to HAQ's table.
  * 'bitfusion': Bit Fusion at the paper's Eyeriss-comparison point.
  * 'systolic': a TPU-like 32x32 int8 systolic array.
  * 'cim': a compute-in-memory (RRAM crossbar) design, NeuroSim's defaults.
  * 'table:PATH.npy': any HAQ-format lookup table.

Every preset is a frozen dataclass; `get_target(name, **overrides)` returns
it with fields replaced (e.g. `get_target('systolic', rows=128, cols=128,
dataflow='ws')`), validated like a directly built config.
"""

from __future__ import annotations

from typing import Any

from haqjax.hardware import base
from haqjax.hardware.bismo import BISMO_CLOUD
from haqjax.hardware.bismo import BISMO_EDGE
from haqjax.hardware.bitfusion import BITFUSION
from haqjax.hardware.cim import CIM
from haqjax.hardware.systolic import SYSTOLIC
from haqjax.hardware.table import TableTarget

PRESETS: dict[str, Any] = {
    "bismo-edge": BISMO_EDGE,
    "bismo-cloud": BISMO_CLOUD,
    "bitfusion": BITFUSION,
    "systolic": SYSTOLIC,
    "cim": CIM,
}
TARGETS = (*PRESETS, "table:PATH.npy")


def get_target(name: str, **overrides: Any) -> base.Target:
  """The preset `name` with `overrides` applied.

  Args:
    name: one of `TARGETS`; 'table:PATH' loads the `.npy` table at PATH.
    **overrides: dataclass fields to replace.

  Returns:
    The target config.

  Raises:
    ValueError: unknown name or field, bad value, unreadable table.
  """
  if name.startswith("table:"):
    path = name[len("table:"):]
    if not path:
      raise ValueError("target 'table:' needs a path, e.g. table:latency.npy")
    return TableTarget.from_file(path, **overrides)
  if name not in PRESETS:
    raise ValueError(f"target is {name!r}; allowed: {', '.join(TARGETS)}")
  return base.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
