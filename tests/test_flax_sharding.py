"""Data parallelism over a 2-device mesh (CPU devices forced by XLA_FLAGS in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from klvae.errors import InputShapeError
    from klvae.flax import FlaxAutoencoderKL
    from klvae.flax.parallel import replicate, shard_batch

    fields = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
    model = FlaxAutoencoderKL(**fields, precision="highest")
    params = model.init_weights(jax.random.key(0))
    # move every parameter off its init value (zero biases, unit norms)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    x = jax.random.uniform(jax.random.key(2), (4, 3, 10, 14), minval=-1, maxval=1)

    def roundtrip(p, x):
        posterior = model.apply({"params": p}, x, method="encode").latent_dist
        return posterior.mean, model.apply({"params": p}, posterior.mode(), method="decode").sample

    fast = {"xla_backend_optimization_level": 0}  # compile time; the program is the same
    step = jax.jit(roundtrip, compiler_options=fast)
    single = jax.device_get(step(params, x))
    mesh = jax.make_mesh((2,), ("data",))  # explicit axis types: shardings are part of the array types
    mean, sample = step(replicate(params, mesh), shard_batch(x, mesh))
    auto = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # the classic mode
    auto_mean, auto_sample = step(replicate(params, auto), shard_batch(x, auto))
    try:
        shard_batch(x[:3], mesh)
        odd_batch = "accepted"
    except InputShapeError as e:
        odd_batch = str(e)
    print(json.dumps({
        "devices": jax.device_count(),
        "sample_devices": sorted(d.id for d in sample.sharding.device_set),
        "shard_shapes": sorted({tuple(s.data.shape) for s in sample.addressable_shards}),
        "mean_err": float(np.abs(np.asarray(mean) - single[0]).max() / np.abs(single[0]).max()),
        "sample_err": float(np.abs(np.asarray(sample) - single[1]).max() / np.abs(single[1]).max()),
        "auto_devices": sorted(d.id for d in auto_sample.sharding.device_set),
        "auto_err": float(np.abs(np.asarray(auto_sample) - single[1]).max() / np.abs(single[1]).max()),
        "odd_batch": odd_batch,
    }))
''')


def test_batch_sharded_over_two_devices_gives_single_device_result():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    assert result["sample_devices"] == [0, 1]
    assert result["shard_shapes"] == [[2, 3, 10, 14]]  # each device holds half the batch
    assert result["mean_err"] <= 1e-5 and result["sample_err"] <= 1e-5
    assert result["auto_devices"] == [0, 1] and result["auto_err"] <= 1e-5
    assert "does not split over 2 devices" in result["odd_batch"]
