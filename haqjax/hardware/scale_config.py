"""Reads SCALE-Sim's `.cfg` files (its `scale_config.read_conf_file`).

The format is an INI file::

    [general]
    run_name = tpu_ws

    [architecture_presets]
    ArrayHeight:    32
    ArrayWidth:     32
    IfmapSramSzkB:  64
    FilterSramSzkB: 64
    OfmapSramSzkB:  64
    Dataflow:       ws
    Bandwidth:      10

    [layout]                      # optional (SCALE-Sim v3)
    IfmapSRAMBankBandwidth: 10
    FilterSRAMBankBandwidth: 10

    [run_presets]
    InterfaceBandwidth: USER

Keys are case-insensitive, values follow `:` or `=`. Required: `run_name`,
`ArrayHeight`, `ArrayWidth`, the three SRAM sizes (KiB), `Dataflow` ('os',
'ws', 'is'), `InterfaceBandwidth` ('USER' or 'CALC') and, with 'USER',
`Bandwidth` (words per cycle; SCALE-Sim uses the first of a comma-separated
list). SCALE-Sim v3 feeds the ifmap and filter buffers from the `[layout]`
section's `IfmapSRAMBankBandwidth` and `FilterSRAMBankBandwidth` and the ofmap
buffer from `Bandwidth`; where `[layout]` is absent all three use `Bandwidth`
(SCALE-Sim v2). Other keys (offsets, request buffers, sparsity, Ramulator)
are ignored. SCALE-Sim's words are one byte (`word_size = 1`); the config has
no key for it.
"""

from __future__ import annotations

import configparser
import dataclasses
import os

DATAFLOWS = ("os", "ws", "is")
BANDWIDTH_MODES = ("USER", "CALC")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleConfig:
  """A SCALE-Sim architecture config.

  Attributes:
    run_name: SCALE-Sim's run name.
    rows, cols: PE array height and width.
    ifmap_sram_kb, filter_sram_kb, ofmap_sram_kb: SRAM sizes in KiB.
    dataflow: 'os', 'ws' or 'is'.
    bandwidth_mode: 'USER' (the given DRAM bandwidth, stalls simulated) or
      'CALC' (no stalls; SCALE-Sim reports the bandwidth needed).
    bandwidth: DRAM words per cycle of the ofmap buffer (USER), else None.
    ifmap_bandwidth, filter_bandwidth: DRAM words per cycle of the ifmap and
      filter buffers (USER), else None.
    word_bytes: bytes per word (1 in SCALE-Sim).
    source: the file read.
  """
  run_name: str
  rows: int
  cols: int
  ifmap_sram_kb: int
  filter_sram_kb: int
  ofmap_sram_kb: int
  dataflow: str
  bandwidth_mode: str
  bandwidth: float | None = None
  ifmap_bandwidth: float | None = None
  filter_bandwidth: float | None = None
  word_bytes: int = 1
  source: str = "config"

  def systolic_fields(self) -> dict:
    """The `haqjax.hardware.Systolic` fields this config sets."""
    kib = 1024 * self.word_bytes
    fields = dict(rows=self.rows, cols=self.cols, dataflow=self.dataflow,
                  ifmap_sram_bytes=self.ifmap_sram_kb * kib,
                  filter_sram_bytes=self.filter_sram_kb * kib,
                  ofmap_sram_bytes=self.ofmap_sram_kb * kib,
                  bandwidth_mode=self.bandwidth_mode.lower())
    if self.bandwidth_mode == "USER":
      fields.update(dram_bytes_per_cycle=float(self.bandwidth * self.word_bytes),
                    ifmap_bytes_per_cycle=float(self.ifmap_bandwidth * self.word_bytes),
                    filter_bytes_per_cycle=float(self.filter_bandwidth * self.word_bytes))
    return fields


def _line_of(text: str, section: str, key: str | None) -> int | None:
  """1-based line of `key` in `[section]` (of the header if key is None)."""
  current = None
  for i, raw in enumerate(text.splitlines(), start=1):
    line = raw.strip()
    if line.startswith("[") and line.endswith("]"):
      current = line[1:-1].strip().lower()
      if key is None and current == section.lower():
        return i
    elif current == section.lower() and key is not None:
      name = line.replace("=", ":").split(":", 1)[0].strip().lower()
      if name == key.lower():
        return i
  return None


class _Reader:
  """Looks up keys, raising one-line ValueErrors that locate the mistake."""

  def __init__(self, parser: configparser.ConfigParser, text: str, path: str):
    self.parser, self.text, self.path = parser, text, path

  def where(self, section: str, key: str | None = None) -> str:
    line = _line_of(self.text, section, key)
    place = f"[{section}]" + (f" {key}" if key else "")
    return f"{self.path}:{line}: {place}" if line else f"{self.path}: {place}"

  def get(self, section: str, key: str) -> str:
    if not self.parser.has_section(section):
      raise ValueError(f"{self.path}: section [{section}] is missing; it must "
                       f"hold {key}")
    if not self.parser.has_option(section, key):
      raise ValueError(f"{self.path}: [{section}] {key} is missing")
    return self.parser.get(section, key).strip()

  def choice(self, section: str, key: str, allowed: tuple[str, ...],
             upper: bool = False) -> str:
    raw = self.get(section, key)
    v = raw.upper() if upper else raw.lower()
    if v not in allowed:
      raise ValueError(f"{self.where(section, key)} is {raw!r}; allowed: "
                       f"{', '.join(allowed)}")
    return v

  def positive(self, section: str, key: str, first_of_list: bool = False) -> int:
    raw = self.get(section, key)
    cell = raw.split(",")[0].strip() if first_of_list else raw
    try:
      v = int(cell)
    except ValueError:
      v = None
    if v is None or v < 1:
      raise ValueError(f"{self.where(section, key)} is {raw!r}; allowed: a "
                       "positive integer")
    return v


def parse_scale_config(text: str, path: str = "config") -> ScaleConfig:
  """Parses the text of a SCALE-Sim `.cfg` file (`path` names it in errors)."""
  parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"))
  try:
    parser.read_string(text, source=path)
  except configparser.Error as e:
    raise ValueError(f"{path}: not a SCALE-Sim config ({str(e).splitlines()[0]})") from None
  r = _Reader(parser, text, path)
  arch = "architecture_presets"
  run_name = r.get("general", "run_name")
  mode = r.choice("run_presets", "InterfaceBandwidth", BANDWIDTH_MODES, upper=True)
  fields = dict(
      run_name=run_name,
      rows=r.positive(arch, "ArrayHeight"), cols=r.positive(arch, "ArrayWidth"),
      ifmap_sram_kb=r.positive(arch, "IfmapSramSzkB"),
      filter_sram_kb=r.positive(arch, "FilterSramSzkB"),
      ofmap_sram_kb=r.positive(arch, "OfmapSramSzkB"),
      dataflow=r.choice(arch, "Dataflow", DATAFLOWS), bandwidth_mode=mode)
  if mode == "USER":
    bw = r.positive(arch, "Bandwidth", first_of_list=True)
    layout = parser.has_section("layout")
    bank = lambda key: (r.positive("layout", key)
                        if layout and parser.has_option("layout", key) else bw)
    fields.update(bandwidth=float(bw),
                  ifmap_bandwidth=float(bank("IfmapSRAMBankBandwidth")),
                  filter_bandwidth=float(bank("FilterSRAMBankBandwidth")))
  return ScaleConfig(source=path, **fields)


def read_scale_config(path: str) -> ScaleConfig:
  """Reads a SCALE-Sim `.cfg` file.

  Raises:
    ValueError: a missing or unreadable file, a missing section or key, a
      value that is not a positive integer, an unknown dataflow or bandwidth
      mode; the message names the file, line, key, value and what is allowed.
  """
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"config file {path!r} cannot be read ({e})") from None
  return parse_scale_config(text, path)
