"""Latent scaling helpers for the three conventions, checked against hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klvae import InputShapeError, preset, scale_latents, unscale_latents


def test_sd_convention():
    z = torch.randn(2, 4, 3, 5)
    cfg = preset("sd1")
    torch.testing.assert_close(scale_latents(z, cfg), z * 0.18215)
    torch.testing.assert_close(unscale_latents(scale_latents(z, cfg), cfg), z)


def test_flux_convention_with_shift():
    z = np.random.default_rng(0).standard_normal((1, 16, 4, 4)).astype(np.float32)
    cfg = preset("flux")
    np.testing.assert_allclose(scale_latents(z, cfg), (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, cfg), cfg), z, rtol=1e-5, atol=1e-6)
    assert scale_latents(z, cfg).dtype == np.float32


def test_mean_std_convention_per_channel():
    mean, std = (0.5, -1.0, 2.0, 0.0), (2.0, 4.0, 0.5, 1.0)
    cfg = preset("sdxl").replace(scaling_factor=0.5, latents_mean=mean, latents_std=std)
    z = torch.randn(3, 4, 2, 6, dtype=torch.float64)
    expected = torch.stack([(z[:, c] - mean[c]) * 0.5 / std[c] for c in range(4)], dim=1)
    torch.testing.assert_close(scale_latents(z, cfg), expected)
    torch.testing.assert_close(unscale_latents(expected, cfg), z)
    assert scale_latents(z.to(torch.bfloat16), cfg).dtype == torch.bfloat16


def test_mean_std_channel_mismatch_is_an_error():
    cfg = preset("sdxl").replace(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    with pytest.raises(InputShapeError, match="do not have 4 channels"):
        scale_latents(torch.zeros(1, 16, 2, 2), cfg)
