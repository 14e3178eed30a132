"""Slicing gives the batched result (up to fp32 kernel rounding); "blend" tiling reproduces diffusers' tiled output."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, diffusers_pair, rel_err

import klvae
from klvae.torch import tiled_decode, tiled_encode


def test_slicing_identical():
    _, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    x = torch.rand(3, 3, 12, 10) * 2 - 1
    with torch.no_grad():
        moments = ours.encode(x).latent_dist.parameters
        z = ours.encode(x).latent_dist.mode()
        decoded = ours.decode(z).sample
        ours.enable_slicing()
        assert rel_err(ours.encode(x).latent_dist.parameters, moments) <= 1e-5
        assert rel_err(ours.decode(z).sample, decoded) <= 1e-5
        ours.disable_slicing()
        assert torch.equal(ours.decode(z).sample, decoded)


def _tile(model, size: int, overlap: float = 0.25) -> None:
    if isinstance(model, klvae.AutoencoderKL):
        model.enable_tiling("blend")  # diffusers' algorithm (klvae's default mode is "exact")
    else:
        model.enable_tiling()
    model.tile_sample_min_size = size
    model.tile_latent_min_size = size // (2 ** (len(model.config.block_out_channels) - 1))
    model.tile_overlap_factor = overlap


@pytest.mark.parametrize("config_name", ["two_blocks", "sd3_like_16ch", "three_blocks_l2"])
@pytest.mark.parametrize("lat_hw", [(13, 17), (9, 20)])
def test_blend_tiling_equals_diffusers(config_name, lat_hw):
    theirs, ours = diffusers_pair(TINY_CONFIGS[config_name])
    f = ours.config.downsample_factor
    for m in (theirs, ours):
        _tile(m, 8 * f)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, ours.config.latent_channels, *lat_hw, generator=g)
    x = torch.rand(2, 3, lat_hw[0] * f, lat_hw[1] * f, generator=g) * 2 - 1
    with torch.no_grad():
        tiled = ours.decode(z).sample
        assert rel_err(tiled, theirs.decode(z).sample) <= 1e-5
        assert rel_err(ours.encode(x).latent_dist.parameters, theirs.encode(x).latent_dist.parameters) <= 1e-5
        assert rel_err(ours(x).sample, theirs(x).sample) <= 1e-5
        # Tiling actually happened: the result differs from the untiled decode.
        ours.disable_tiling()
        assert rel_err(tiled, ours.decode(z).sample) > 1e-3


def test_tiling_with_slicing_and_public_functions():
    theirs, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    for m in (theirs, ours):
        _tile(m, 16, overlap=0.3)
        m.enable_slicing()
    z = torch.randn(3, 4, 11, 19)
    x = torch.rand(2, 3, 30, 22) * 2 - 1
    with torch.no_grad():
        expected = theirs.decode(z).sample
        assert rel_err(ours.decode(z).sample, expected) <= 1e-5
        assert rel_err(ours.tiled_decode(z).sample, theirs.tiled_decode(z).sample) <= 1e-5
        assert rel_err(tiled_decode(ours, z, mode="blend"), theirs.tiled_decode(z).sample) <= 1e-5
        assert rel_err(tiled_encode(ours, x, mode="blend"), theirs._tiled_encode(x)) <= 1e-5


def test_small_inputs_are_not_tiled():
    _, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        plain = ours.decode(z).sample
        _tile(ours, 16)
        assert torch.equal(ours.decode(z).sample, plain)


def test_enable_tiling_options_are_checked():
    _, ours = diffusers_pair(TINY_CONFIGS["two_blocks"])
    ours.enable_tiling(tile_sample_min_size=24, tile_overlap_factor=0.5)
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == (24, 12, 0.5)
    with pytest.raises(ValueError, match="multiple of 2"):
        ours.enable_tiling(tile_sample_min_size=25)
    with pytest.raises(ValueError, match="unknown tiling mode"):
        ours.enable_tiling(mode="magic")
