"""Tests of the SCALE-Sim config reader and the CLI's --config."""

import dataclasses

import pytest

from haqjax import hardware
from haqjax.hardware import __main__ as cli
from haqjax.hardware import scale_config

GOOD = """[general]
run_name = tpu_ws

[architecture_presets]
ArrayHeight:    16
ArrayWidth:     8
IfmapSramSzkB:  4
FilterSramSzkB: 2
OfmapSramSzkB:  1
IfmapOffset:    0
Dataflow : ws
Bandwidth : 10,20

[run_presets]
InterfaceBandwidth: USER
UseRamulatorTrace: False
"""
LAYOUT = "\n[layout]\nIfmapSRAMBankBandwidth: 4\nFilterSRAMBankBandwidth: 6\n"
TOPOLOGY = ("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, "
            "Channels, Num Filter, Strides,\nC1, 10, 10, 3, 3, 8, 16, 1,\n")


def test_reads_a_user_config(tmp_path):
  path = tmp_path / "scale.cfg"
  path.write_text(GOOD)
  c = scale_config.read_scale_config(str(path))
  assert (c.run_name, c.rows, c.cols, c.dataflow) == ("tpu_ws", 16, 8, "ws")
  assert (c.ifmap_sram_kb, c.filter_sram_kb, c.ofmap_sram_kb) == (4, 2, 1)
  assert (c.bandwidth_mode, c.bandwidth) == ("USER", 10.0)
  assert (c.ifmap_bandwidth, c.filter_bandwidth, c.word_bytes) == (10.0, 10.0, 1)
  t = hardware.get_target("systolic", **c.systolic_fields())
  assert (t.rows, t.cols, t.ifmap_sram_bytes, t.ofmap_sram_bytes) == (16, 8, 4096, 1024)
  assert (t.bandwidth_mode, t.dram_bytes_per_cycle) == ("user", 10.0)


def test_layout_bandwidths_and_calc():
  c = scale_config.parse_scale_config(GOOD + LAYOUT)
  assert (c.ifmap_bandwidth, c.filter_bandwidth, c.bandwidth) == (4.0, 6.0, 10.0)
  calc = scale_config.parse_scale_config(
      GOOD.replace("USER", "CALC").replace("Bandwidth : 10,20\n", ""))
  assert calc.bandwidth_mode == "CALC" and calc.bandwidth is None
  assert hardware.get_target("systolic", **calc.systolic_fields()).bandwidth_mode == "calc"


@pytest.mark.parametrize("text,msg", [
    (GOOD.replace("Dataflow : ws", "Dataflow : rs"),
     r"f.cfg:11: \[architecture_presets\] Dataflow is 'rs'; allowed: os, ws, is"),
    (GOOD.replace("ArrayWidth:     8", "ArrayWidth: eight"),
     r"f.cfg:6: \[architecture_presets\] ArrayWidth is 'eight'; allowed: a positive integer"),
    (GOOD.replace("OfmapSramSzkB:  1", "OfmapSramSzkB: 0"),
     r"OfmapSramSzkB is '0'; allowed: a positive integer"),
    (GOOD.replace("IfmapSramSzkB:  4\n", ""),
     r"f.cfg: \[architecture_presets\] IfmapSramSzkB is missing"),
    (GOOD.replace("Bandwidth : 10,20\n", ""),
     r"\[architecture_presets\] Bandwidth is missing"),
    (GOOD.replace("USER", "AUTO"),
     r"f.cfg:15: \[run_presets\] InterfaceBandwidth is 'AUTO'; allowed: USER, CALC"),
    (GOOD.replace("[general]\nrun_name = tpu_ws\n", ""),
     r"section \[general\] is missing"),
    ("ArrayHeight: 4\n", r"f.cfg: not a SCALE-Sim config"),
])
def test_malformed_files_name_the_mistake(text, msg):
  with pytest.raises(ValueError, match=msg):
    scale_config.parse_scale_config(text, "f.cfg")


def test_missing_file(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    scale_config.read_scale_config(str(tmp_path / "none.cfg"))


def test_cli_config_and_flag_precedence(tmp_path, capsys):
  cfg, topo = tmp_path / "scale.cfg", tmp_path / "net.csv"
  cfg.write_text(GOOD.replace("IfmapSramSzkB:  4", "IfmapSramSzkB:  1"))
  topo.write_text(TOPOLOGY)
  assert cli.main(["--target=systolic", f"--config={cfg}", f"--topology={topo}"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  head = out[0].split(",")
  assert head == list(cli.HEADER) + ["ifmap_dram_bytes", "filter_dram_bytes",
                                     "ofmap_dram_bytes"]
  row = dict(zip(head, out[1].split(",")))
  t = hardware.get_target("systolic", rows=16, cols=8, dataflow="ws",
                          bandwidth_mode="user", ifmap_sram_bytes=1024,
                          filter_sram_bytes=2048, ofmap_sram_bytes=1024,
                          dram_bytes_per_cycle=10.0, ifmap_bytes_per_cycle=10.0,
                          filter_bytes_per_cycle=10.0)
  layers = hardware.read_topology(str(topo))
  c = hardware.layer_costs(t, layers, 8.0, 8.0)
  for k in ("cycles", "compute_cycles", "stall_cycles", "ifmap_dram_bytes",
            "ofmap_dram_bytes"):
    assert float(row[k]) == round(float(c[k][0])), k
  assert float(row["cycles"]) == float(row["compute_cycles"]) + float(row["stall_cycles"])
  # Flags given explicitly override the file.
  assert cli.main(["--target=systolic", f"--config={cfg}", f"--topology={topo}",
                   "--array=4x4", "--dataflow=os"]) == 0
  row = dict(zip(head, capsys.readouterr().out.strip().splitlines()[1].split(",")))
  os_t = dataclasses.replace(t, rows=4, cols=4, dataflow="os")
  assert float(row["compute_cycles"]) == float(
      hardware.layer_costs(os_t, layers, 8.0, 8.0)["compute_cycles"][0])
  assert cli.main(["--target=bitfusion", f"--config={cfg}", f"--topology={topo}"]) == 2
  assert "--config applies to --target=systolic only" in capsys.readouterr().err
