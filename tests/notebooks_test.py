"""Every notebook in experiments/notebooks/ runs top to bottom, and is stored stripped.

Notebooks read HAQJAX_NOTEBOOK_SMALL=1 and then use small settings (a small
model, few steps), so each runs in CI time on the CPU. The kernel is this
interpreter, registered in a temporary folder: nothing is downloaded.
"""

import base64
import glob
import io
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "experiments", "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def test_the_notebooks_are_found():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  for name in ("bring_your_own_model.ipynb", "hardware.ipynb", "quickstart.ipynb",
               "sweeps.ipynb"):
    assert name in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"cell {i} has outputs; strip them before committing"
      assert cell.execution_count is None, f"cell {i} has an execution count"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """A 'python3' kernel spec for this interpreter, and the small settings.

  The kernels share the tests' persistent compilation cache (conftest.py):
  the notebooks' stages compile some of the same steps (the digits model's
  FP32 and QAT steps, in both job notebooks), which are then read back
  instead of compiled again.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ipykernel import kernelspec  # pylint: disable=g-import-not-at-top
  prefix = tmp_path_factory.mktemp("jupyter")
  kernelspec.install(kernel_name="python3", prefix=str(prefix))
  env = {"JUPYTER_PATH": os.path.join(prefix, "share", "jupyter"),
         "HAQJAX_NOTEBOOK_SMALL": "1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
  if jax.config.jax_compilation_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
        jax.config.jax_persistent_cache_min_compile_time_secs)
  return env


def _png_sizes(nb):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  sizes = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      data = out.get("data", {})
      if "image/png" in data:
        with Image.open(io.BytesIO(base64.b64decode(data["image/png"]))) as im:
          im.load()
          sizes.append(im.size)
  return sizes


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_without_error(path, kernel_env, monkeypatch):
  for key, value in kernel_env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()  # Raises CellExecutionError on the first failing cell.
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.execution_count is not None for c in code)
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  # Every figure a notebook draws is a real picture, not an empty canvas.
  for size in _png_sizes(nb):
    assert size[0] >= 300 and size[1] >= 200, size
  if os.path.basename(path) == "hardware.ipynb":
    # Per-layer costs, policies, the roofline; HAQ's table when it is there.
    assert len(_png_sizes(nb)) >= 3
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    for target in ("bismo-edge", "bismo-cloud", "bitfusion", "systolic"):
      assert target in text
    assert "x W8A8" in text and "model quickstart_cnn;" in text
  if os.path.basename(path) == "sweeps.ipynb":
    # The Pareto plot, the members' bits, the search progress.
    assert len(_png_sizes(nb)) >= 3
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    html = "".join(o.get("data", {}).get("text/html", "") for c in code for o in c.outputs)
    assert "<table>" in html and "uniform W4A4" in html
    # One compiled step for all members; the stack is the members' own values.
    assert re.search(r"stacked train step traced 1 time\(s\) for 3 members", text), text
    assert "member k of the stack is member k's own HParams: True" in text
    # The per-member table: one row per member, each within its budget.
    head = next(l for l in text.splitlines() if l.startswith("| member |"))
    columns = [c.strip() for c in head.strip("|").split("|")]
    members = [[c.strip() for c in l.strip("|").split("|")]
               for l in text.splitlines() if re.match(r"^\| \d+ \|", l)]
    assert [m[0] for m in members] == ["0", "1", "2"], text
    for m in members:
      assert m[columns.index("fits")] == "yes", m
      assert m[columns.index("test top-1")].endswith("%"), m
      assert re.fullmatch(r"\d(-\d)+", m[columns.index("W bits")]), m
    assert "python -m experiments.sweep --flagfile=experiments/flags/quickstart_sweep.flags" in text
  if os.path.basename(path) == "bring_your_own_model.ipynb":
    # A plain-flax ViT: its attention matmuls are table rows and policy entries,
    # the searched policy fits the bismo-edge budget, uniform points beside it.
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    markdown = "".join(o.get("data", {}).get("text/markdown", "")
                       for c in code for o in c.outputs)
    assert re.search(r"DotProductAttention_0/qk\s+matmul", text), text
    assert re.search(r"DotProductAttention_0/pv\s+matmul", text), text
    assert "policy covers the attention matmuls: True" in text, text
    assert "fits the budget: True" in text, text
    assert "| uniform W4A4 |" in markdown and "| found (gumbel) |" in markdown, markdown
    assert len(_png_sizes(nb)) >= 2
