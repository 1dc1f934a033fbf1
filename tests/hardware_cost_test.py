"""Tests of policy costs, cost tensors, expected costs, budgets and the CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haqjax import hardware
from haqjax.hardware import __main__ as cli

TARGETS = ("bismo-edge", "bismo-cloud", "bitfusion", "systolic")


@pytest.fixture(scope="module")
def layers():
  return hardware.from_model("quickstart_cnn", num_classes=10, batch=4)


@pytest.mark.parametrize("name", TARGETS)
def test_tensor_matches_policy_cost(name, layers):
  target = hardware.get_target(name)
  t = np.asarray(hardware.cost_tensor(target, layers, metric="cycles"))
  assert t.shape == (len(layers), 8, 8)
  rng = np.random.default_rng(0)
  w = rng.integers(1, 9, size=(5, len(layers)))
  a = rng.integers(1, 9, size=(5, len(layers)))
  got = np.asarray(hardware.policy_cost(target, layers, w, a, "cycles"))
  idx = np.arange(len(layers))
  want = t[idx, w - 1, a - 1].sum(-1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(
      hardware.batched_policy_cost(target, layers, w, a, "cycles"), want, rtol=1e-6)


@pytest.mark.parametrize("name", TARGETS)
def test_expected_cost_exact_at_one_hot_and_differentiable(name, layers):
  target = hardware.get_target(name)
  bits = (2, 4, 6, 8)
  rng = np.random.default_rng(1)
  wi = rng.integers(0, 4, size=len(layers))
  ai = rng.integers(0, 4, size=len(layers))
  p = jax.nn.one_hot(wi, 4)
  q = jax.nn.one_hot(ai, 4)
  for metric in ("latency", "size", "bitops"):
    exact = hardware.policy_cost(target, layers, np.array(bits)[wi],
                                 np.array(bits)[ai], metric)
    got = hardware.expected_cost(target, layers, p, q, bits, metric)
    np.testing.assert_allclose(got, exact, rtol=1e-5)
  grad = jax.grad(lambda p: hardware.expected_cost(target, layers, p, q, bits))(
      jnp.full((len(layers), 4), 0.25))
  assert grad.shape == (len(layers), 4) and np.isfinite(grad).all()


def test_one_trace_serves_many_policies(layers):
  traces = []

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Counting(hardware.Systolic):
    def layer_cost(self, layers, w_bits, a_bits):
      traces.append(1)
      return super().layer_cost(layers, w_bits, a_bits)

  target = Counting()
  rng = np.random.default_rng(2)
  for _ in range(20):
    w = rng.integers(1, 9, size=len(layers)).astype(np.float32)
    hardware.policy_cost(target, layers, w, w, "energy")
  assert len(traces) == 1
  many = rng.integers(1, 9, size=(1000, len(layers))).astype(np.float32)
  out = hardware.batched_policy_cost(target, layers, many, many, "energy")
  assert out.shape == (1000,) and len(traces) == 2


def test_size_and_bitops(layers):
  t = hardware.SYSTOLIC
  w = np.full(len(layers), 4.0)
  size = float(hardware.policy_cost(t, layers, w, w, "size"))
  assert size == pytest.approx(float((layers.weights * 4 + layers.biases * 32).sum()) / 8)
  km = float(hardware.size_bits(layers, 4.0, kmeans=True).sum())
  assert km == pytest.approx(size * 8 + 16 * 32 * len(layers))
  assert float(hardware.policy_cost(t, layers, w, 2 * w, "bitops")) == pytest.approx(
      float(layers.macs.sum()) * 32)
  # Float layers count 32 bits in size, but run as 8 bits on the accelerator.
  f = np.full(len(layers), 32.0)
  assert float(hardware.policy_cost(t, layers, f, f, "size")) > size
  assert float(hardware.policy_cost(hardware.BISMO_EDGE, layers, f, f, "cycles")) == \
      float(hardware.policy_cost(hardware.BISMO_EDGE, layers, 8 + 0 * f, 8 + 0 * f, "cycles"))


@pytest.mark.parametrize("model", ("quickstart_cnn", "resnet20", "mobilenet_v2_small"))
def test_kmeans_size_counts_the_codebooks(model):
  from haqjax import models  # pylint: disable=g-import-not-at-top
  from haqjax.nn import layer_table  # pylint: disable=g-import-not-at-top
  from haqjax.quant import kmeans_size_bits  # pylint: disable=g-import-not-at-top
  table = layer_table(models.create(model, num_classes=10),
                      (1, *models.INPUT_SHAPES[model]))
  layers = hardware.from_layer_table(table)
  rng = np.random.default_rng(3)
  w = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 32], size=len(layers))
  # Labels and a 2**w-entry float32 codebook per layer, 32-bit biases: bytes.
  want = (sum(int(kmeans_size_bits(int(n), int(b))) for n, b in zip(table.weight_count, w))
          + 32 * int((table.params - table.weight_count).sum())) / 8
  plain = (int((table.weight_count * w).sum())
           + 32 * int((table.params - table.weight_count).sum())) / 8
  got = hardware.policy_cost(hardware.SYSTOLIC, layers, w, w, "kmeans_size")
  assert float(got) == pytest.approx(want, rel=1e-6)
  assert want - plain == sum(2 ** int(b) * 4 for b in w if b != 32)  # The codebooks.
  budget = hardware.Budget(metric="kmeans_size", value=1.0, reference="w2a2")
  assert budget.resolve(hardware.SYSTOLIC, layers) == pytest.approx(
      (int(table.weight_count.sum()) * 2 + 4 * 32 * len(layers)
       + 32 * int((table.params - table.weight_count).sum())) / 8, rel=1e-12)


def test_missing_metric_and_bad_metric(layers):
  with pytest.raises(ValueError, match="does not model 'energy'"):
    hardware.policy_cost(hardware.BISMO_EDGE, layers, 8.0, 8.0, "energy")
  with pytest.raises(ValueError, match="metric is 'speed'"):
    hardware.policy_cost(hardware.SYSTOLIC, layers, 8.0, 8.0, "speed")
  assert "energy" not in hardware.available_metrics(hardware.BISMO_EDGE, layers)


def test_budgets(layers):
  t = hardware.BISMO_EDGE
  ref = hardware.uniform_cost(t, layers, 8, 8)
  b = hardware.Budget(metric="latency", value=0.5)
  limit = b.resolve(t, layers)
  assert limit == pytest.approx(0.5 * ref)
  assert bool(b.fits(0.4 * ref, limit)) and not bool(b.fits(0.6 * ref, limit))
  with pytest.raises(ValueError, match="needs its resolved limit"):
    b.fits(1.0)
  size = hardware.Budget(metric="size", value=0.25, reference="fp32")
  w32 = hardware.uniform_cost(t, layers, 32, 32, "size")
  assert size.resolve(t, layers) == pytest.approx(0.25 * w32)
  w4a4 = hardware.Budget(metric="latency", value=1.0, reference="w4a4")
  assert w4a4.resolve(t, layers) == pytest.approx(
      hardware.uniform_cost(t, layers, 4, 4, "latency"))
  ab = hardware.Budget(metric="energy", value=1e-3, kind="absolute")
  assert ab.resolve(t, layers) == 1e-3 and bool(ab.fits(5e-4))
  for kwargs, msg in [(dict(metric="speed"), "Budget.metric is 'speed'"),
                      (dict(value=-1.0), "Budget.value is -1.0"),
                      (dict(kind="relative"), "Budget.kind is 'relative'"),
                      (dict(reference="w9a4"), "Budget.reference is 'w9a4'"),
                      (dict(reference="int8"), "Budget.reference is 'int8'")]:
    with pytest.raises(ValueError, match=msg):
      hardware.Budget(**kwargs)


def test_table_target(tmp_path, layers):
  table = np.arange(len(layers) * 64, dtype=np.int64).reshape(len(layers), 8, 8) + 1
  path = tmp_path / "t.npy"
  np.save(path, table)
  t = hardware.get_target(f"table:{path}")
  np.testing.assert_array_equal(hardware.cost_tensor(t, layers, metric="cycles"), table)
  w = np.array([1, 32, 3][:len(layers)] + [2] * (len(layers) - 3))
  got = float(hardware.policy_cost(t, layers, w, w, "cycles"))
  idx = np.arange(len(layers))
  assert got == float(table[idx, np.minimum(w, 8) - 1, np.minimum(w, 8) - 1].sum())
  np.save(tmp_path / "bad.npy", np.zeros((3, 4)))
  with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
    hardware.get_target(f"table:{tmp_path / 'bad.npy'}")


def test_cli_systolic_topology(tmp_path, capsys):
  path = tmp_path / "net.csv"
  path.write_text("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, "
                  "Channels, Num Filter, Strides,\nC1, 6, 6, 3, 3, 2, 5, 1,\n")
  rc = cli.main(["--target=systolic", "--array=4x4", "--dataflow=ws",
                 f"--topology={path}", "--w_bits=8", "--a_bits=8"])
  out = capsys.readouterr().out.strip().splitlines()
  assert rc == 0
  assert out[0] == ("layer,macs,cycles,compute_cycles,stall_cycles,utilization,dram_bytes,"
                    "energy_pj,compute_energy_pj,sram_energy_pj,dram_energy_pj")
  # ws: K=18, N=5, M=16 on 4x4: ceil(18/4)*ceil(5/4) folds of (16 + 2*4 + 4 - 2),
  # no stall (its 242 DRAM bytes take under 8 cycles at 32 bytes per cycle).
  assert out[1].split(",")[:5] == ["C1", str(16 * 18 * 5), str(5 * 2 * 26), "260", "0"]
  assert out[-1].startswith("total,1440,260,260,0,")


def test_cli_reads_a_policy_file(tmp_path, capsys):
  from haqjax.policy import Policy  # pylint: disable=g-import-not-at-top
  from haqjax.policy import save_policy  # pylint: disable=g-import-not-at-top
  layers = hardware.from_model("quickstart_cnn", num_classes=10)
  w = np.array([8, 4, 3, 2, 5, 6, 8])
  a = np.array([32, 4, 4, 3, 2, 8, 8])
  path = tmp_path / "policy.json"
  save_policy(path, Policy.create(layers.names, w, a), model="quickstart_cnn",
              num_classes=10, input_shape=[28, 28, 1])
  assert cli.main(["--target=bismo-edge", f"--policy={path}"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  t = hardware.get_target("bismo-edge")
  cycles = np.asarray(hardware.layer_costs(t, layers, w, a)["cycles"])
  assert [int(r.split(",")[2]) for r in out[1:-1]] == [int(round(c)) for c in cycles]
  # A policy of another model is refused, naming the mismatch.
  assert cli.main(["--target=bismo-edge", f"--policy={path}", "--model=resnet20"]) == 2
  assert "layers" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--target=foo", "--model=quickstart_cnn"], "target is 'foo'"),
    (["--topology=/no/such.csv"], "does not exist"),
    (["--model=quickstart_cnn", "--w_bits=9"], "--w_bits is 9"),
    (["--model=quickstart_cnn", "--array=4by4"], "--array is '4by4'"),
    (["--target=bitfusion", "--model=quickstart_cnn", "--dataflow=os"], "--dataflow applies"),
    (["--model=nope"], "model is 'nope'"),
    (["--model=quickstart_cnn", "--batch=0"], "--batch is 0"),
    (["--bogus"], "unrecognized arguments"),
    (["--policy=/no/such.json"], "--policy file '/no/such.json' does not exist"),
    (["--target=bitfusion", "--model=quickstart_cnn", "--memory=user"],
     "--memory is 'user'; allowed for --target=bitfusion: tiled, stream"),
    (["--target=bismo-edge", "--model=quickstart_cnn", "--memory=tiled"],
     "--memory applies to --target=bitfusion or systolic"),
])
def test_cli_errors(argv, msg, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("target,memory,field,columns", [
    ("bitfusion", "stream", "memory", False),
    ("bitfusion", "tiled", "memory", True),
    ("systolic", "user", "bandwidth_mode", True),
    ("systolic", "roofline", "bandwidth_mode", False),
])
def test_cli_memory_flag(target, memory, field, columns, capsys):
  argv = [f"--target={target}", "--model=quickstart_cnn", "--num_classes=10",
          "--w_bits=4", "--a_bits=4", "--batch=2"]
  assert cli.main([*argv, f"--memory={memory}"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert ("ifmap_dram_bytes" in out[0].split(",")) == columns
  # The rows are those of the preset with the memory field set.
  config = hardware.get_target(target, **{field: memory})
  layers = hardware.from_model("quickstart_cnn", num_classes=10, batch=2)
  assert out == [",".join(r) for r in cli.rows(config, layers, 4, 4)]
