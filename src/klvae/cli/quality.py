"""Reconstruction quality in numpy (either backend): PSNR, SSIM, an error heat map and the comparison image.

PSNR and SSIM take (H, W, C) images in [0, 1]. SSIM follows Wang et al. (2004): an 11-tap Gaussian window
with sigma 1.5, K1 = 0.01, K2 = 0.03, population (co)variances, averaged over channels and the window
positions that fit inside the image; it equals ``skimage.metrics.structural_similarity(..., data_range=1,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1)``.
"""

from __future__ import annotations

import math

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
# Anchor colours of the heat map (black - purple - red - orange - pale yellow, like "inferno").
_HEAT_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                         dtype=np.float32) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (inf when they are equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _gaussian(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _blur_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (H, W, C) with the 1-D kernel ``g`` along H then W."""
    n = len(g)
    rows = sum(g[i] * x[i:x.shape[0] - n + 1 + i] for i in range(n))
    return sum(g[i] * rows[:, i:rows.shape[1] - n + 1 + i] for i in range(n))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two (H, W, C) images in [0, 1]; NaN when a side is under 11 pixels."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(a.shape[:2]) < SSIM_WINDOW:
        return math.nan
    g = _gaussian(SSIM_WINDOW, SSIM_SIGMA)
    mx, my = _blur_valid(a, g), _blur_valid(b, g)
    vx = _blur_valid(a * a, g) - mx * mx
    vy = _blur_valid(b * b, g) - my * my
    cov = _blur_valid(a * b, g) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def error_heatmap(a: np.ndarray, b: np.ndarray, full_scale: float) -> np.ndarray:
    """(H, W, 3) colour map of the per-pixel absolute error (mean over channels); ``full_scale`` maps to the
    brightest colour, so maps made with one scale compare across images and models."""
    err = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean(axis=-1)
    t = np.clip(err / full_scale, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    i = np.minimum(t.astype(np.int64), len(_HEAT_ANCHORS) - 2)
    f = (t - i)[..., None]
    return _HEAT_ANCHORS[i] * (1 - f) + _HEAT_ANCHORS[i + 1] * f


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] shown as RGB: grey repeated, alpha composited over a mid-grey checkerboard."""
    c = pixels.shape[-1]
    colour, alpha = (pixels[..., :-1], pixels[..., -1:]) if c in (2, 4) else (pixels, None)
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    if alpha is not None:
        h, w = pixels.shape[:2]
        yy, xx = np.mgrid[:h, :w]
        board = np.where(((yy // 8 + xx // 8) % 2)[..., None] == 0, 0.6, 0.4).astype(np.float32)
        colour = colour * alpha + board * (1 - alpha)
    return colour


def comparison_image(original: np.ndarray, reconstruction: np.ndarray, full_scale: float,
                     gap: int = 4) -> np.ndarray:
    """original | reconstruction | error heat map, side by side on white, as (H, 3W + 2 gap, 3)."""
    panels = [as_rgb(original), as_rgb(reconstruction), error_heatmap(original, reconstruction, full_scale)]
    h = original.shape[0]
    spacer = np.ones((h, gap, 3), np.float32)
    return np.concatenate([panels[0], spacer, panels[1], spacer, panels[2]], axis=1)
