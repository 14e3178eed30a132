"""Flax "exact" and "auto" tiling: the untiled output computed tile by tile, from the plan shared with torch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import klvae.flax.model as flax_model_module  # noqa: E402
from conftest import rel_err  # noqa: E402
from klvae.flax import tiled_decode, tiled_encode  # noqa: E402
from klvae.flax.attention import attend  # noqa: E402
from test_flax_parity import FP32_TOL, images, make_pair  # noqa: E402


@pytest.fixture
def exact_runs(monkeypatch):
    """Counts the calls that really went through the exact executor (rather than running untiled)."""
    calls: list[tuple] = []
    real = flax_model_module.run_exact

    def spy(module, params, plan, x):
        calls.append(plan.grid.shape)
        return real(module, params, plan, x)

    monkeypatch.setattr(flax_model_module, "run_exact", spy)
    return calls


def test_exact_tiling_equals_untiled_torch(exact_runs):
    torch_model, model, params = make_pair("two_blocks", precision="highest")
    z = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(0))  # odd sizes: uneven tiles
    x = images(torch_model.config, 2, 9, 7)
    with torch.no_grad():
        expected_sample = torch_model.decode(z).sample
        expected_moments = torch_model.encode(x).latent_dist.parameters
        torch_model.enable_tiling("exact", tile_sample_min_size=8)
        torch_exact = torch_model.decode(z).sample
    exact = model.with_tiling("exact", tile_sample_min_size=8)
    sample = exact.apply({"params": params}, jnp.asarray(z.numpy()), method="decode").sample
    moments = exact.apply({"params": params}, jnp.asarray(x.numpy()), method="encode").latent_dist.parameters
    assert exact_runs == [(3, 2), (3, 2)]  # both really ran in 3 x 2 tiles
    assert rel_err(sample, expected_sample) <= FP32_TOL
    assert rel_err(moments, expected_moments) <= FP32_TOL
    assert rel_err(sample, torch_exact) <= FP32_TOL


def test_exact_tiling_three_levels(exact_runs):
    torch_model, model, params = make_pair("three_blocks_l2", precision="highest")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch_model.decode(z).sample
    sample = tiled_decode(model, params, jnp.asarray(z.numpy()), mode="exact", tile_sample_min_size=16)
    assert exact_runs == [(2, 2)]
    assert rel_err(sample, expected) <= FP32_TOL


def test_functional_exact_with_slicing_and_memory_limit(exact_runs):
    torch_model, model, params = make_pair("sd3_like_16ch", precision="highest")
    z = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model.decode(z).sample
    sample = tiled_decode(model.with_slicing(), params, jnp.asarray(z.numpy()), mode="exact",
                          tile_sample_min_size=8, memory_limit=1e9)
    assert exact_runs == [(2, 3), (2, 3)]  # one run per batch item
    assert rel_err(sample, expected) <= FP32_TOL
    small = tiled_encode(model, params, jnp.zeros((1, 3, 8, 8)), mode="exact", tile_sample_min_size=8)
    assert small.mean.shape == (1, 16, 4, 4) and len(exact_runs) == 2  # fits one tile: ran untiled


def test_auto_runs_untiled_when_it_fits_and_exact_when_not(exact_runs):
    from klvae.tiling_plan import plan_exact, untiled_estimate

    torch_model, model, params = make_pair("two_blocks")
    z = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(2))  # shapes as above: compiled ops reused
    with torch.no_grad():
        expected = torch_model.decode(z).sample
    config = torch_model.config
    untiled_peak, _ = untiled_estimate(config, "decode", (9, 7), 2, 4)
    tiled_peak = plan_exact(config, "decode", (9, 7), 2, 4, 4).peak_bytes
    assert tiled_peak < untiled_peak
    roomy = model.with_tiling("auto", tile_sample_min_size=8, memory_limit=2 * untiled_peak)
    tight = model.with_tiling("auto", tile_sample_min_size=8, memory_limit=(tiled_peak + untiled_peak) / 2)
    zj = jnp.asarray(z.numpy())
    # fits: untiled, so it traces and runs under jit too
    untiled = jax.jit(lambda p, z: roomy.apply({"params": p}, z, method="decode").sample)(params, zj)
    assert exact_runs == []
    tiled = tight.apply({"params": params}, zj, method="decode").sample  # only an exact plan fits the limit
    assert exact_runs == [(3, 2)]
    assert rel_err(untiled, expected) <= FP32_TOL and rel_err(tiled, expected) <= FP32_TOL


def test_exact_refuses_a_bad_memory_limit():  # (exact tiling under jit: tests/test_flax_traced_tiling.py)
    _, model, _ = make_pair("two_blocks")
    with pytest.raises(Exception, match="tiling_memory_limit"):
        model.with_tiling("exact", memory_limit=-1)


def test_chunked_attention_equals_plain():
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 37, 8)) for key in keys)
    run = jax.jit(attend, static_argnums=(3, 4, 5))
    plain = run(q, k, v, 0.3, None, None)
    for chunk in (5, 36, 37):
        assert np.allclose(run(q, k, v, 0.3, None, chunk), plain, rtol=1e-6, atol=1e-6)
