"""Data parallelism over 8 virtual CPU devices, in a separate process."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import functools, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from haqjax import data, models, parallel
    from haqjax.nn import layer_table
    from haqjax.policy import Policy
    from haqjax.train import Config, steps, train_and_evaluate

    assert jax.device_count() == 8, jax.devices()
    out = {}
    # 1. One sharded training step equals the same step on one device.
    splits = data.load("digits", data_dir=sys.argv[1], val_size=200)
    model = models.create("digits_cnn", num_classes=10)
    tx = steps.make_optimizer(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.0)
    state = steps.init_state(jax.random.key(0), model, tx, (1, 8, 8, 1))
    names = layer_table(model, (1, 8, 8, 1)).names
    policy = Policy.uniform(names, 4, 4)
    step = jax.jit(functools.partial(steps.train_step, model, tx))
    mesh = parallel.data_mesh()
    sharded = next(data.batches(splits.train, batch_size=64, seed=0, epoch=0, shuffle=True,
                                drop_remainder=True, sharding=parallel.batch_sharding(mesh)))
    out["batch_devices"] = len(sharded["image"].sharding.device_set)
    out["shard_rows"] = sharded["image"].addressable_shards[0].data.shape[0]
    local = jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]), sharded)
    s1, m1 = step(parallel.replicate(state, mesh), sharded, policy)
    s0, m0 = step(jax.device_put(state, jax.devices()[0]), local, policy)
    out["loss_sharded"], out["loss_single"] = float(m1["loss"]), float(m0["loss"])
    out["param_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(jax.device_get(s0.params))))
    # 2. The whole trainer runs on the 8-device mesh.
    config = Config(dataset="digits", model="digits_cnn", val_size=200, epochs=3,
                    batch_size=64, eval_batch_size=200, learning_rate=0.05,
                    progress=False, tensorboard=False, data_dir=sys.argv[1])
    results = train_and_evaluate(config, sys.argv[2])
    out["devices"], out["test_top1"] = results["devices"], results["test_top1"]
    print(json.dumps(out))
""")


def test_eight_virtual_devices(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "data"),
                         str(tmp_path / "run")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["batch_devices"] == 8 and out["shard_rows"] == 8
  assert abs(out["loss_sharded"] - out["loss_single"]) < 1e-4
  assert out["param_diff"] < 1e-4
  assert out["devices"] == 8
  assert out["test_top1"] > 70
