"""Reconstruction metrics per image: PSNR and SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_unit(x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """[-1, 1] images -> [0, 1], clipped, and rounded to 8-bit levels when ``quantize`` (as a saved PNG is)."""
    x = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return torch.round(x * 255.0) / 255.0 if quantize else x


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images with values in [0, data_range]: shape (B,)."""
    mse = (x.double() - y.double()).square().mean(dim=(1, 2, 3))
    return (10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))).float()


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
         ) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images, averaged over channels and the valid (unpadded) window positions;
    equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=-1)``."""
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    c = x.shape[1]
    g = _gaussian_window(window, sigma, x.dtype)
    kh = g.view(1, 1, window, 1).repeat(c, 1, 1, 1)
    kw = g.view(1, 1, 1, window).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (as the SD VAE model cards report ``mean +- std``)."""
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
