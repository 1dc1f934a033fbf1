"""README.md's "Your own Flax model" example runs as written.

The block is taken from the README and executed unchanged on what it
expects the reader to have: a plain flax model (a user's, here tiny), its
variables and numpy arrays (tiny, so the search takes seconds).
"""

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("## Your own Flax model", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
  assert len(blocks) == 1, blocks
  return blocks[0]


class TinyNet(nn.Module):
  """A plain flax model, as a user writes it."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=2)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(3)(x)


def _arrays(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = y[:, None, None, None] - 1.0 + 0.3 * rng.standard_normal((n, 6, 6, 1))
  return x.astype(np.float32), y


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
  model = TinyNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
  (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
      _arrays(256, 0), _arrays(64, 1), _arrays(64, 2))
  namespace = dict(model=model, variables=variables, x_train=x_train, y_train=y_train,
                   x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test)
  monkeypatch.chdir(tmp_path)
  exec(compile(readme_example(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  result = namespace["result"]
  out = capsys.readouterr().out

  # The layer table and the report name the model's own layers.
  assert "Conv_0" in out and "Dense_0" in out and "bismo-edge" in out
  assert result.policy.names == ("Conv_0", "Dense_0")
  # Within the budget, which is uniform W4A4's latency: the W4A4 point costs it.
  assert result.fits and result.cost <= result.limit * (1 + 1e-9)
  w4a4 = next(u for u in result.uniform if u["label"] == "w4a4")
  np.testing.assert_allclose(w4a4["cost"], result.limit, rtol=1e-12)
  np.testing.assert_allclose(result.layer_costs.sum(), result.cost, rtol=1e-12)
  # The FP32 figure is the user's own model on the user's arrays.
  direct = 100.0 * np.mean(np.argmax(model.apply(variables, x_val), -1) == y_val)
  np.testing.assert_allclose(result.fp32["val_top1"], direct, atol=1e-9)
  # What result.write wrote.
  folder = tmp_path / "byom_report"
  for name in ("report.md", "policy.json", "results.json", "plots/bits.png"):
    assert (folder / name).is_file(), name
  saved = json.loads((folder / "policy.json").read_text())
  assert [l["name"] for l in saved["layers"]] == ["Conv_0", "Dense_0"]
  assert json.loads((folder / "results.json").read_text())["fits"] is True
