"""Flax slicing and blend tiling against the PyTorch backend's (diffusers' algorithm, shared tile plan)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from conftest import rel_err  # noqa: E402
from klvae.errors import ConfigError  # noqa: E402
from klvae.flax import tiled_decode, tiled_encode  # noqa: E402
from test_flax_parity import FAST_COMPILE, FP32_TOL, images, make_pair  # noqa: E402

TILE = 8        # pixels; two_blocks downsamples by 2, so 4 latents per tile
OVERLAP = 0.25


def _jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def test_blend_tiling_matches_torch():
    torch_model, model, params = make_pair("two_blocks", precision="highest")
    torch_model.enable_tiling("blend", tile_sample_min_size=TILE, tile_overlap_factor=OVERLAP)
    tiled = model.with_tiling("blend", tile_sample_min_size=TILE, tile_overlap_factor=OVERLAP)
    x = images(torch_model.config, 2, 7, 9)  # 14 x 18 pixels: edge tiles are truncated
    z = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected_moments = torch_model.encode(x).latent_dist.parameters
        expected_sample = torch_model.decode(z).sample
        untiled_sample = torch_model._decode_latents(z)

    @_jit
    def run(p, x, z):
        variables = {"params": p}
        return (tiled.apply(variables, x, method="encode").latent_dist.parameters,
                tiled.apply(variables, z, method="decode").sample)

    moments, sample = run(params, jnp.asarray(x.numpy()), jnp.asarray(z.numpy()))
    assert moments.shape == tuple(expected_moments.shape) and sample.shape == tuple(expected_sample.shape)
    assert rel_err(moments, expected_moments) <= FP32_TOL
    assert rel_err(sample, expected_sample) <= FP32_TOL
    assert rel_err(sample, untiled_sample) > 1e-3  # blend tiling really changed the result


def test_functional_tiling_and_small_inputs():
    torch_model, model, params = make_pair("sd3_like_16ch", precision="highest")
    torch_model.enable_tiling("blend", tile_sample_min_size=TILE, tile_overlap_factor=0.5)
    z = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(3))
    small = torch.randn(2, 16, 4, 3, generator=torch.Generator().manual_seed(4))  # fits in one tile
    with torch.no_grad():
        expected = torch_model.decode(z).sample
        expected_small = torch_model.decode(small).sample
        expected_forced = torch_model.tiled_decode(small).sample  # tiles whatever the size
    tiled = model.with_tiling(tile_sample_min_size=TILE, tile_overlap_factor=0.5)

    @_jit
    def run(p, z, small):
        return (tiled_decode(model, p, z, tile_sample_min_size=TILE, tile_overlap_factor=0.5),
                tiled.apply({"params": p}, small, method="decode").sample,
                tiled.apply({"params": p}, small, method="tiled_decode").sample)

    sample, sample_small, forced = run(params, jnp.asarray(z.numpy()), jnp.asarray(small.numpy()))
    assert rel_err(sample, expected) <= FP32_TOL
    assert rel_err(sample_small, expected_small) <= FP32_TOL
    assert rel_err(forced, expected_forced) <= FP32_TOL


def test_functional_tiled_encode_matches_torch():
    torch_model, model, params = make_pair("two_blocks", precision="highest")
    torch_model.enable_tiling("blend", tile_sample_min_size=TILE)
    x = images(torch_model.config, 1, 9, 6)
    with torch.no_grad():
        expected = torch_model.tiled_encode(x).latent_dist
    posterior = _jit(lambda p, x: tiled_encode(model, p, x, tile_sample_min_size=TILE))(params, jnp.asarray(x.numpy()))
    assert rel_err(posterior.mean, expected.mean) <= FP32_TOL
    assert rel_err(posterior.logvar, expected.logvar) <= FP32_TOL


def test_slicing_equals_batched_and_composes_with_tiling():
    torch_model, model, params = make_pair("two_blocks", precision="highest")
    torch_model.enable_slicing()
    torch_model.enable_tiling("blend", tile_sample_min_size=TILE)
    x = images(torch_model.config, 3, 5, 3)
    z = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch_model.decode(z).sample
    sliced = model.with_slicing()
    both = sliced.with_tiling(tile_sample_min_size=TILE)

    @_jit
    def run(p, x, z):
        v = {"params": p}
        return (model.apply(v, x, method="encode").latent_dist.parameters,
                sliced.apply(v, x, method="encode").latent_dist.parameters,
                model.apply(v, z, method="decode").sample,
                sliced.apply(v, z, method="decode").sample,
                both.apply(v, z, method="decode").sample)

    moments, sliced_moments, sample, sliced_sample, tiled_sliced = run(
        params, jnp.asarray(x.numpy()), jnp.asarray(z.numpy()))
    assert rel_err(sliced_moments, moments) <= 1e-6
    assert rel_err(sliced_sample, sample) <= 1e-6
    assert rel_err(tiled_sliced, expected) <= FP32_TOL
    # The sliced program really loops over the batch one item at a time.
    hlo = jax.jit(lambda p, z: sliced.apply({"params": p}, z, method="decode").sample).lower(
        params, jnp.asarray(z.numpy())).as_text()
    assert "while" in hlo


def test_tiling_options_are_checked():
    _, model, _ = make_pair("two_blocks")
    with pytest.raises(ConfigError, match="unknown tiling mode"):
        model.with_tiling("bogus")
    with pytest.raises(ConfigError, match="multiple of 2"):
        model.with_tiling(tile_sample_min_size=7)
    with pytest.raises(ConfigError, match="tile_overlap_factor"):
        model.with_tiling(tile_overlap_factor=1.0)
    assert not model.with_tiling().with_tiling(enabled=False).use_tiling
    assert model.with_slicing().use_slicing and not model.use_slicing  # copies; the original is unchanged


def test_network_traced_once_per_tile_shape():
    """Tiles of one shape share one traced network in a lax.map: the program does not grow with the tile count."""
    _, model, params = make_pair("two_blocks")
    tiled = model.with_tiling(tile_sample_min_size=TILE)

    def conv_count(h: int, w: int) -> int:
        z = jnp.zeros((1, 4, h, w))
        text = jax.jit(lambda p, z: tiled.apply({"params": p}, z, method="decode").sample).lower(params, z).as_text()
        return text.count("stablehlo.convolution")

    small, large = conv_count(7, 7), conv_count(31, 31)  # 3 x 3 tiles against 11 x 11, both with edge tiles
    assert small == large
    assert small <= 4 * conv_count(4, 4)  # at most four tile shapes, each one network


def test_init_with_tiling_on_a_large_input():
    from klvae.weights.flax import flatten_tree, flax_param_shapes

    _, model, _ = make_pair("two_blocks")
    tiled = model.with_tiling(tile_sample_min_size=TILE).with_slicing()
    shapes = jax.eval_shape(tiled.init, jax.random.key(0), jnp.zeros((2, 3, 20, 20)))["params"]
    assert {p: tuple(v.shape) for p, v in flatten_tree(shapes).items()} == flax_param_shapes(model.config)
