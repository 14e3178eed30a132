"""Flax exact tiling under jax.jit, and the "sharded" mode (row bands over a mesh axis) on 2 CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import klvae.flax.model as flax_model_module  # noqa: E402
from conftest import rel_err  # noqa: E402
from klvae.errors import ConfigError  # noqa: E402
from test_flax_parity import FAST_COMPILE, FP32_TOL, images, make_pair  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def test_jitted_exact_equals_untiled_and_torch(monkeypatch):
    traced_runs: list[tuple] = []
    real = flax_model_module.run_exact

    def spy(module, params, plan, x):
        traced_runs.append((plan.grid.shape, isinstance(x, jax.core.Tracer)))
        return real(module, params, plan, x)

    monkeypatch.setattr(flax_model_module, "run_exact", spy)
    torch_model, model, params = make_pair("two_blocks", precision="highest")
    z = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(0))  # odd sizes: uneven tiles
    x = images(torch_model.config, 2, 9, 7)
    with torch.no_grad():
        torch_sample = torch_model.decode(z).sample
        torch_moments = torch_model.encode(x).latent_dist.parameters

    def run(m):
        def both(p, x, z):
            return (m.apply({"params": p}, x, method="encode").latent_dist.parameters,
                    m.apply({"params": p}, z, method="decode").sample)
        return jax.jit(both, compiler_options=FAST_COMPILE)(params, jnp.asarray(x.numpy()), jnp.asarray(z.numpy()))

    moments, sample = run(model)
    exact_moments, exact_sample = run(model.with_tiling("exact", tile_sample_min_size=8))
    assert traced_runs == [((3, 2), True), ((3, 2), True)]  # traced, in 3 x 2 tiles, encode and decode
    assert rel_err(exact_sample, sample) <= FP32_TOL and rel_err(exact_moments, moments) <= FP32_TOL
    assert rel_err(sample, torch_sample) <= FP32_TOL and rel_err(moments, torch_moments) <= FP32_TOL


def test_sharded_mode_needs_a_mesh_and_its_axis():
    _, model, _ = make_pair("two_blocks")
    with pytest.raises(ConfigError, match="needs a jax.sharding.Mesh"):
        model.with_tiling("sharded")
    mesh = jax.make_mesh((1,), ("x",))
    with pytest.raises(ConfigError, match="no axis 'rows'"):
        model.with_tiling("sharded", mesh=mesh, axis="rows")
    assert model.with_tiling("sharded", mesh=mesh).tiling_mesh is mesh


SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, TESTS)
    from test_flax_parity import FAST_COMPILE, make_pair

    torch_model, model, params = make_pair("two_blocks", precision="highest")
    mesh = jax.make_mesh((2,), ("x",))
    sharded = model.with_tiling("sharded", mesh=mesh, axis="x")

    def err(a, b):
        return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())

    def programs(m):
        return (jax.jit(lambda p, z: m.apply({"params": p}, z, method="decode").sample, compiler_options=FAST_COMPILE),
                jax.jit(lambda p, x: m.apply({"params": p}, x, method="encode").latent_dist.parameters,
                        compiler_options=FAST_COMPILE))

    (decode, encode), (sharded_decode, sharded_encode) = programs(model), programs(sharded)
    result = {"devices": jax.device_count()}
    # an even split at a moderate size (activations outweigh the attention's whole latent): values and memory
    z = jax.random.normal(jax.random.key(0), (2, 4, 32, 24))
    single, split = decode.lower(params, z).compile(), sharded_decode.lower(params, z).compile()
    out = split(params, z)
    text = split.as_text()
    result.update(decode_even=err(out, single(params, z)), devices=sorted(d.id for d in out.sharding.device_set),
                  band_shapes=sorted({tuple(s.data.shape) for s in out.addressable_shards}),
                  temp_single=single.memory_analysis().temp_size_in_bytes,
                  temp_sharded=split.memory_analysis().temp_size_in_bytes,
                  collective_permutes=text.count("collective-permute"), all_gathers=text.count("all-gather"))
    # 9 latent rows do not split evenly over 2 devices; batch 2, odd width
    z = jax.random.normal(jax.random.key(1), (2, 4, 9, 7))
    x = jax.random.uniform(jax.random.key(2), (2, 3, 18, 14), minval=-1, maxval=1)
    result.update(decode_uneven=err(sharded_decode(params, z), decode(params, z)),
                  encode_uneven=err(sharded_encode(params, x), encode(params, x)))
    print(json.dumps(result))
''')


def test_sharded_over_two_devices_equals_untiled():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = f"TESTS = {os.path.dirname(os.path.abspath(__file__))!r}\n" + SCRIPT
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == [0, 1] and result["band_shapes"] == [[2, 3, 32, 48]]  # NCHW rows split in two
    for case in ("decode_even", "decode_uneven", "encode_uneven"):
        assert result[case] <= FP32_TOL, (case, result)
    # halos by collective permute, GroupNorm moments and the attention's input by all-gather
    assert result["collective_permutes"] > 0 and result["all_gathers"] > 0
    # each device holds about half the activations (and at this size none of the untiled attention's scores)
    assert result["temp_sharded"] <= 0.55 * result["temp_single"], result
