"""PSNR and SSIM in numpy (for the JAX trainer and any backend); same definitions as klvae.torch.train.metrics."""

from __future__ import annotations

import numpy as np


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR (dB) of (B, C, H, W) arrays with values in [0, data_range]."""
    mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2, axis=(1, 2, 3))
    return 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-20))


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM (Gaussian window, valid positions, averaged over channels) of (B, C, H, W) arrays."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    r = np.arange(window) - (window - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    g /= g.sum()

    def blur(t: np.ndarray) -> np.ndarray:
        t = np.lib.stride_tricks.sliding_window_view(t, window, axis=-2) @ g
        return np.lib.stride_tricks.sliding_window_view(t, window, axis=-1) @ g

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2, 3))


def to_unit(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1], clipped and rounded to 8-bit levels."""
    return np.round(np.clip((np.asarray(x, np.float32) + 1) / 2, 0, 1) * 255) / 255
