"""Tests of the search plots (haqjax/report/plots/: bits, progress, pareto, canvas)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from haqjax.report import plots

DPI = 60  # Small images keep the file fast; sizes scale with dpi.


def _layers(n):
  kinds = ["conv"] + ["depthwise" if i % 2 else "conv" for i in range(1, n - 1)]
  return [dict(name=f"block{i}/{k}", kind=k, in_channels=8, out_channels=8,
               kernel_h=3, stride=1, macs=1000, params=72)
          for i, k in enumerate(kinds + ["dense"])]


def _policy(layers, a0=32, seed=0):
  rng = np.random.default_rng(seed)
  rows = [dict(name=l["name"], w_bits=int(rng.integers(2, 9)),
               a_bits=int(rng.integers(2, 9))) for l in layers]
  rows[0]["a_bits"] = a0
  return {"format": "haqjax.policy/1", "layers": rows}


def _check_png(path, fig, dpi=DPI):
  """A real PNG of the figure's pixel size with visible content."""
  with Image.open(path) as im:
    assert im.format == "PNG"
    want = np.round(fig.get_size_inches() * dpi)
    assert np.all(np.abs(np.array(im.size) - want) <= 1), (im.size, want)
    rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
  assert len(np.unique(rgb, axis=0)) > 20
  non_white = np.any(rgb < 250, axis=1).mean()
  assert 0.03 < non_white < 0.95, non_white


def _legend_texts(fig):
  legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes]
  return [t.get_text() for leg in legends if leg for t in leg.get_texts()]


# ------------------------------------------------------------ policy bits


@pytest.mark.parametrize("n", [6, 58])
def test_policy_bits_png_and_labels(tmp_path, n):
  layers = _layers(n)
  policy = _policy(layers)
  fig = plots.policy_bits_figure(layers, policy, dpi=DPI)
  assert isinstance(fig, Figure) and len(fig.axes) == 1
  ax = fig.axes[0]
  assert ax.get_xlabel().startswith("layer index")
  assert ax.get_ylabel().startswith("bits")
  assert f"{n} layers" in fig.get_suptitle()
  labels = [t.get_text() for t in ax.get_xticklabels()]
  assert len(labels) == n and labels[0].startswith("0")
  assert ("block1/depthwise" in labels[1]) == (n <= 20)
  legend = _legend_texts(fig)
  assert {"conv (full / pointwise)", "depthwise conv", "dense"} <= set(legend)
  assert "activation bits (down)" in legend
  path = plots.plot_policy_bits(tmp_path / "p.png", layers, policy, dpi=DPI)
  assert path == os.fspath(tmp_path / "p.png")
  _check_png(path, fig)


def test_policy_bits_float_activation_is_a_marker():
  layers = _layers(4)
  policy = _policy(layers, a0=32)
  ax = plots.policy_bits_figure(layers, policy, dpi=DPI).axes[0]
  low, high = ax.get_ylim()
  assert -10 < low < 0 < high < 10  # A 32-bit input does not stretch the axis.
  heights = [abs(p.get_height()) for p in ax.patches]
  assert heights and max(heights) <= 8
  assert len(heights) == 2 * 4 - 1  # Every weight bar; no bar for layer 0's input.
  markers = [l for l in ax.get_lines() if l.get_marker() == "D"]
  assert len(markers) == 1
  np.testing.assert_allclose(markers[0].get_xdata(), [0])
  assert markers[0].get_ydata()[0] < 0
  assert any("float" in t for t in _legend_texts(ax.figure))
  # Y tick labels read as bit counts on both sides.
  ax.figure.canvas.draw()
  assert all(not t.get_text().startswith(("-", "\u2212"))
             for t in ax.get_yticklabels())


def test_policy_bits_without_float_has_no_float_legend():
  layers = _layers(3)
  fig = plots.policy_bits_figure(layers, _policy(layers, a0=8), dpi=DPI)
  assert not any("float" in t for t in _legend_texts(fig))
  assert "depthwise conv" in _legend_texts(fig)  # Layer 1 is depthwise.


def test_policy_bits_accepts_policy_object():
  from haqjax.policy import Policy  # Imports JAX; the plots themselves do not.
  layers = _layers(3)
  policy = Policy.create([l["name"] for l in layers], [2, 4, 8], [32, 4, 6])
  ax = plots.policy_bits_figure(layers, policy, dpi=DPI).axes[0]
  assert sorted(round(p.get_height()) for p in ax.patches) == [-6, -4, 2, 4, 8]


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["layers"][1].update(name="other"),
     "policy layers[1].name is 'other'; layers[1].name is 'block1/depthwise'"),
    (lambda p: p["layers"].pop(), "policy has 2 layers; layers has 3"),
    (lambda p: p.pop("layers"), "policy must be a haqjax.policy.Policy"),
])
def test_policy_bits_rejects_mismatch(edit, message):
  layers = _layers(3)
  policy = _policy(layers)
  edit(policy)
  with pytest.raises(ValueError, match=r"^[^\n]*$") as e:
    plots.policy_bits_figure(layers, policy)
  assert str(e.value).startswith(message)


# -------------------------------------------------------- search progress


def _episodes(n=40, warmup=10, val=False):
  rng = np.random.default_rng(1)
  eps = []
  for i in range(n):
    e = dict(episode=i, reward=float(rng.normal()), cost=float(0.004 + 1e-4 * rng.normal()),
             warmup=i < warmup)
    if val:
      e["val_top1"] = float(60 + rng.normal())
    eps.append(e)
  return eps


def test_search_progress_png_labels_and_ms_scaling(tmp_path):
  eps = _episodes()
  budget = dict(metric="latency", unit="s", limit=0.0045)
  reference = dict(label="W4A4", cost=0.0042)
  fig = plots.search_progress_figure(eps, budget=budget, reference=reference,
                                     dpi=DPI)
  assert len(fig.axes) == 2
  top, bottom = fig.axes
  assert top.get_ylabel() == "reward (unitless)"
  assert bottom.get_ylabel() == "latency (ms)"
  assert bottom.get_xlabel() == "episode"
  assert fig.get_suptitle()
  hlines = {round(l.get_ydata()[0], 6): l.get_linestyle() for l in bottom.get_lines()}
  assert hlines == {4.5: "-", 4.2: "--"}  # Budget and reference, in ms.
  assert "budget 4.5 ms" in _legend_texts(fig) and "W4A4 (4.2 ms)" in _legend_texts(fig)
  assert {"reward (warm-up)", "reward", "best so far", "warm-up"} <= set(_legend_texts(fig))
  path = plots.plot_search_progress(tmp_path / "s.png", eps, budget=budget,
                                    reference=reference, dpi=DPI)
  _check_png(path, fig)


def test_search_progress_best_so_far_and_val_panel():
  eps = _episodes(n=12, warmup=0, val=True)[::-1]  # Sorted by episode inside.
  fig = plots.search_progress_figure(eps, budget=dict(metric="energy", unit="J"))
  assert len(fig.axes) == 3
  assert fig.axes[1].get_ylabel() == "val top-1 (%)"
  assert fig.axes[2].get_ylabel() == "energy (mJ)"
  rewards = [e["reward"] for e in sorted(eps, key=lambda e: e["episode"])]
  (best,) = [l for l in fig.axes[0].get_lines() if l.get_label() == "best so far"]
  np.testing.assert_allclose(best.get_ydata(), np.maximum.accumulate(rewards))


def test_search_progress_rejects_missing_key():
  with pytest.raises(ValueError, match=r"episodes\[1\] has no 'cost'"):
    plots.search_progress_figure([dict(episode=0, reward=0.0, cost=1.0),
                                  dict(episode=1, reward=0.0)])


@pytest.mark.parametrize("unit, values, factor, label", [
    ("s", [0.004, 0.002], 1e3, "ms"),
    ("s", [2.0], 1.0, "s"),
    ("s", [3e-6], 1e6, "\u00b5s"),
    ("J", [0.5], 1e3, "mJ"),
    ("bytes", [3.2e6], 2.0 ** -20, "MiB"),
    ("bytes", [2048.0, 10.0], 2.0 ** -10, "KiB"),
    ("bit-ops", [5e9], 1e-9, "GBitOps"),
    ("bitops", [500.0], 1.0, "BitOps"),
    ("cycles", [3136.0], 1e-3, "kcycles"),
    ("s", [], 1.0, "s"),
    ("s", [None, float("nan"), 0.0], 1.0, "s"),
])
def test_unit_scale(unit, values, factor, label):
  assert plots.unit_scale(unit, values) == (factor, label)


# ------------------------------------------------------- bit probabilities


def _history(n, bits, steps=(0, 50, 100, 150)):
  rng = np.random.default_rng(2)
  out = []
  for s in steps:
    p = rng.random((n, len(bits)))
    out.append((s, (p / p.sum(-1, keepdims=True)).tolist()))
  return out


def test_bit_probabilities_grid(tmp_path):
  bits = [2, 4, 8]
  names = [f"l{i}" for i in range(5)]
  fig = plots.bit_probabilities_figure(_history(5, bits), names=names, bits=bits,
                                       dpi=DPI)
  assert len(fig.axes) == 5  # 4 + 1 in a 2x4 grid; unused cells removed.
  assert fig.axes[0].get_ylabel() == "probability"
  assert fig.axes[4].get_xlabel() == "step" and fig.axes[3].get_xlabel() == "step"
  assert _legend_texts(fig) == ["2-bit", "4-bit", "8-bit"]
  assert fig.get_suptitle().startswith("Weight bit-width")
  assert fig.legends[0].get_title().get_text() == "weight bit-width"
  path = plots.plot_bit_probabilities(tmp_path / "b.png", _history(5, bits),
                                      names=names, bits=bits, dpi=DPI)
  _check_png(path, fig)


def test_bit_probabilities_heatmap(tmp_path):
  bits = [2, 3, 4, 5, 6, 7, 8]
  names = [f"stage{i}/conv" for i in range(30)]
  history = _history(30, bits)
  fig = plots.bit_probabilities_figure(history, names=names, bits=bits,
                                       role="activation", dpi=DPI)
  ax, bar = fig.axes
  assert ax.get_xlabel() == "step" and ax.get_ylabel() == "layer (forward order)"
  assert bar.get_ylabel() == "expected activation bits (bits)"
  expected = np.asarray(ax.collections[0].get_array()).reshape(30, 4)  # [L, T]
  p = np.asarray(history[2][1])
  np.testing.assert_allclose(expected[:, 2], p @ np.asarray(bits), rtol=1e-6)
  path = plots.plot_bit_probabilities(tmp_path / "h.png", history[:1], names=names,
                                      bits=bits, dpi=DPI)  # One step works too.
  _check_png(path, plots.bit_probabilities_figure(history[:1], names=names,
                                                  bits=bits, dpi=DPI))


def test_bit_probabilities_rejects_bad_input():
  with pytest.raises(ValueError, match=r"shape \(2, 3\); expected .* \(2, 2\)"):
    plots.bit_probabilities_figure([(0, np.ones((2, 3)))], names=["a", "b"],
                                   bits=[4, 8])
  with pytest.raises(ValueError, match="role is 'bias'"):
    plots.bit_probabilities_figure([(0, np.ones((1, 1)))], names=["a"], bits=[8],
                                   role="bias")


# ------------------------------------------------------------------ Pareto


def _pt(cost, top1, group="rl", label=""):
  return dict(label=label, group=group, cost=cost, top1=top1)


@pytest.mark.parametrize("points, want", [
    ([], []),
    ([_pt(1, 50)], [(1, 50)]),
    # Dominated points dropped; the result is ordered by cost.
    ([_pt(3, 80), _pt(1, 60), _pt(2, 55), _pt(2, 70), _pt(4, 75)],
     [(1, 60), (2, 70), (3, 80)]),
    # Equal cost: the higher top1 wins. Equal top1: the lower cost wins.
    ([_pt(2, 70), _pt(2, 72), _pt(3, 72), _pt(1, 72)], [(1, 72)]),
    # Exact duplicates are kept once.
    ([_pt(1, 60), _pt(1, 60), _pt(2, 65)], [(1, 60), (2, 65)]),
])
def test_pareto_front(points, want):
  front = plots.pareto_front(points)
  assert [(p["cost"], p["top1"]) for p in front] == want
  assert all(any(p is q for q in points) for p in front)  # The same dicts.


def test_pareto_front_keeps_first_of_duplicates_and_rejects_nan():
  a, b = _pt(1, 60, label="a"), _pt(1, 60, label="b")
  assert plots.pareto_front([a, b])[0] is a
  with pytest.raises(ValueError, match=r"points\[0\].top1 is nan"):
    plots.pareto_front([_pt(1, float("nan"))])


def test_pareto_png_labels_and_front(tmp_path):
  points = [_pt(0.001 * b, 90 - 30 / b, "uniform", f"W{b}A{b}") for b in (2, 4, 8)]
  points += [_pt(0.003, 84.0), _pt(0.005, 83.0), _pt(0.006, 88.0, "gumbel"),
             _pt(0.0035, 80.0, "sweep")]
  fig = plots.pareto_figure(points, metric="latency", unit="s", dpi=DPI)
  ax = fig.axes[0]
  assert ax.get_xlabel() == "latency (ms)"
  assert ax.get_ylabel() == "test top-1 (%)"
  assert fig.get_suptitle() == "Test top-1 vs latency"
  assert {"uniform", "rl", "gumbel", "sweep", "Pareto front (mixed precision)"} \
      <= set(_legend_texts(fig))
  assert {t.get_text() for t in ax.texts} == {"W2A2", "W4A4", "W8A8"}
  (front,) = [l for l in ax.get_lines() if l.get_label().startswith("Pareto")]
  assert front.get_drawstyle() == "steps-post"
  np.testing.assert_allclose(front.get_xdata(), [3, 6, 8])  # Extended to 8 ms.
  np.testing.assert_allclose(front.get_ydata(), [84, 88, 88])
  path = plots.plot_pareto(tmp_path / "f.png", points, dpi=DPI)
  _check_png(path, fig)


def test_versus_uniform_png_reference_delta_and_units(tmp_path):
  found = {"label": "HAQ (RL)", "cost": 7.07e-05, "top1": 91.10}
  reference = {"label": "w4a4", "cost": 7.35e-05, "top1": 90.97}
  uniform = [{"label": "w4a4", "cost": 1.0, "top1": 0.0},  # The reference wins its label.
             {"label": "w3a3", "cost": 6.10e-05, "top1": 88.16},
             {"label": "w8a8", "cost": 1.20e-04, "top1": 91.60}]
  fig = plots.versus_uniform_figure(found, reference, uniform, metric="latency",
                                    unit="s", limit=7.35e-05, dpi=DPI)
  ax = fig.axes[0]
  assert ax.get_xlabel() == "latency (\u00b5s)"
  assert ax.get_ylabel() == "test top-1 (%)"
  assert set(_legend_texts(fig)) == {"uniform", "w4a4 (budget reference)", "HAQ (RL)",
                                     "budget"}
  (line,) = [l for l in ax.get_lines() if l.get_label() == "uniform"]
  np.testing.assert_allclose(line.get_xdata(), [61.0, 73.5, 120.0])  # In cost order, in µs.
  np.testing.assert_allclose(line.get_ydata(), [88.16, 90.97, 91.60])
  texts = {t.get_text() for t in ax.texts}
  assert {"w3a3", "w4a4", "w8a8", "+0.13 pt at 0.962x the cost"} <= texts
  path = plots.plot_versus_uniform(tmp_path / "u.png", found, reference, uniform,
                                   limit=7.35e-05, dpi=DPI)
  _check_png(path, fig)


def test_versus_uniform_without_a_reference_has_no_delta():
  fig = plots.versus_uniform_figure({"label": "Gumbel", "cost": 2048.0, "top1": 70.0}, None,
                                    [{"label": "w4a4", "cost": 4096.0, "top1": 69.0}],
                                    metric="size", unit="bytes", dpi=DPI)
  ax = fig.axes[0]
  assert ax.get_xlabel() == "size (KiB)"
  assert not any("pt at" in t.get_text() for t in ax.texts)
  assert "budget" not in _legend_texts(fig)
  with pytest.raises(ValueError, match=r"points\[1\].top1 is nan"):
    plots.versus_uniform_figure({"cost": 1.0, "top1": 1.0},
                                {"cost": 1.0, "top1": float("nan")}, dpi=DPI)


def test_policy_bits_reference_lines():
  layers = _layers(6)
  fig = plots.policy_bits_figure(layers, _policy(layers), dpi=DPI,
                                 reference={"label": "uniform W4A4", "w_bits": 4,
                                            "a_bits": 3})
  ax = fig.axes[0]
  dashed = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
  assert sorted(float(l.get_ydata()[0]) for l in dashed) == [-3.0, 4.0]
  assert "uniform W4A4: W4 / A3" in _legend_texts(fig)
  plain = plots.policy_bits_figure(layers, _policy(layers), dpi=DPI)
  assert not [l for l in plain.axes[0].get_lines() if l.get_linestyle() == "--"]


# ----------------------------------------------------------- atomic write


def test_write_is_atomic(tmp_path, monkeypatch):
  target = tmp_path / "plot.png"
  target.write_bytes(b"old")
  points = [_pt(1.0, 50.0, "uniform", "W4A4"), _pt(2.0, 60.0)]
  plots.plot_pareto(target, points, unit="J", dpi=DPI)
  assert os.listdir(tmp_path) == ["plot.png"]  # Replaced; no temporary left.
  assert target.read_bytes().startswith(b"\x89PNG")

  target.write_bytes(b"old")
  def fail(*args, **kwargs):
    raise RuntimeError("disk full")
  monkeypatch.setattr(Figure, "savefig", fail)
  with pytest.raises(RuntimeError):
    plots.plot_pareto(target, points, dpi=DPI)
  assert os.listdir(tmp_path) == ["plot.png"]
  assert target.read_bytes() == b"old"  # A failed render leaves the old file.


def test_leaves_pyplot_and_backend_alone(tmp_path):
  # In a fresh process: drawing never imports pyplot or picks a backend.
  code = (
      "import sys, matplotlib\n"
      "matplotlib.use('svg')\n"
      "from haqjax.report import plots\n"
      "plots.plot_pareto(sys.argv[1], [dict(group='rl', cost=1.0, top1=50.0)])\n"
      "assert 'matplotlib.pyplot' not in sys.modules\n"
      "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], check=True,
                 env=env, timeout=120)
  with Image.open(tmp_path / "x.png") as im:
    assert im.format == "PNG"
