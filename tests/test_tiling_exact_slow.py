"""Exact tiling on the real SD architecture (random weights) at odd latent sizes: decode 73x97 and 97x73 latents,
encode 584x776; equal to untiled within 1e-4 (fp32). Minutes on a 2-core CPU: marked slow."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from klvae.torch import tiled_decode, tiled_encode
from klvae.torch.model import AutoencoderKL

SD = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32, sample_size=512)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd_model():
    torch.manual_seed(0)
    return AutoencoderKL(**SD).eval()


@pytest.mark.parametrize("lat_hw", [(73, 97), (97, 73)])
def test_sd_decode_odd_latents(sd_model, lat_hw):
    z = torch.randn(1, 4, *lat_hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = sd_model._decode_latents(z)
        store_all = tiled_decode(sd_model, z, mode="exact", tile_sample_min_size=256, memory_limit=1e12)
        lean = tiled_decode(sd_model, z, mode="exact", tile_sample_min_size=256, memory_limit=2**28)
    assert rel_err(store_all, expected) <= 1e-4
    assert rel_err(lean, expected) <= 1e-4


def test_sd_encode_odd_size(sd_model):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 584, 776, generator=g) * 2 - 1
    x[1] = x[1] * 0.2 + 0.6
    with torch.no_grad():
        expected = sd_model._encode_moments(x)
        got = tiled_encode(sd_model, x, mode="exact", tile_sample_min_size=256)
    assert rel_err(got, expected) <= 1e-4
