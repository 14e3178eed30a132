"""Colour and edge metrics of a reconstruction, in numpy, on (H, W, 3) uint8 images (original, reconstruction).

- colour spread: the mean over pixels of the population standard deviation of each pixel's (R, G, B) values, in
  [0, 1] units; 0 for a grey image. ``colour_spread_ratio`` is the reconstruction's over the original's (1.0:
  colour kept; below 1: washed out towards grey). NaN when the original is grey.
- channel mean error: mean of (reconstruction - original) per channel, in 8-bit levels (a colour cast shows as
  errors of different sign).
- chroma error: the colour spread of the error image, (reconstruction - original), in 8-bit levels: the part of
  the error that is not grey. 0 when every pixel is off by the same amount in R, G and B (a pure brightness
  error); a wrong hue, a tint on a grey image or a washed-out colour all raise it, so unlike the spread ratio
  it cannot be passed by a saturated wrong colour.
- border/interior PSNR: PSNR over the pixels within ``band`` pixels of any image edge, and over the rest; an edge
  artefact shows as a border PSNR well below the interior's.
- worst edge line: the lowest PSNR of the four outermost ``EDGE_LINE``-pixel strips (top, bottom, left, right).
  A one- or two-pixel line along one edge (the default model's top row on chelsea) is diluted in a 16-pixel band
  that runs round all four sides; this one shows it.
"""

from __future__ import annotations

import math

import numpy as np

BORDER_BAND = 16
EDGE_LINE = 2


def _unit(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    return image.astype(np.float64) / 255.0


def colour_spread(image: np.ndarray) -> float:
    """Mean over pixels of the per-pixel std across R, G, B (population std), in [0, 1] units; exactly 0 for a
    grey uint8 image (the variance is taken in integers: 9 var = 3 sum(x^2) - (sum x)^2)."""
    image = np.asarray(image)
    _unit(image[:1, :1])                                   # shape check
    if image.dtype == np.uint8:
        x = image.astype(np.int64)
        nine_var = 3 * (x * x).sum(axis=-1) - x.sum(axis=-1) ** 2
        return float((np.sqrt(nine_var) / 3.0).mean() / 255.0)
    return float((np.asarray(image, np.float64) / 255.0).std(axis=-1).mean())


def colour_spread_ratio(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """``colour_spread(reconstruction) / colour_spread(original)``; NaN for a grey original."""
    spread = colour_spread(original)
    return math.nan if spread == 0 else colour_spread(reconstruction) / spread


def chroma_error(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean over pixels of the population std across R, G, B of (reconstruction - original), in 8-bit levels."""
    diff = _unit(reconstruction) - _unit(original)
    return float(diff.std(axis=-1).mean() * 255.0)


def channel_mean_error(original: np.ndarray, reconstruction: np.ndarray) -> tuple[float, float, float]:
    """Mean of reconstruction - original per channel (R, G, B), in 8-bit levels."""
    diff = _unit(reconstruction) - _unit(original)
    return tuple(float(v) * 255.0 for v in diff.mean(axis=(0, 1)))


def border_mask(height: int, width: int, band: int = BORDER_BAND) -> np.ndarray:
    """(H, W) bool: True within ``band`` pixels of any edge."""
    if 2 * band >= min(height, width):
        raise ValueError(f"a {band}-pixel border band leaves no interior in a {height}x{width} image")
    mask = np.ones((height, width), dtype=bool)
    mask[band:height - band, band:width - band] = False
    return mask


def _psnr(sq_err: np.ndarray) -> float:
    mse = float(sq_err.mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def border_interior_psnr(original: np.ndarray, reconstruction: np.ndarray, band: int = BORDER_BAND
                         ) -> tuple[float, float]:
    """(PSNR of the ``band``-pixel border, PSNR of the interior), in dB, over all three channels."""
    sq = (_unit(reconstruction) - _unit(original)) ** 2
    mask = border_mask(sq.shape[0], sq.shape[1], band)
    return _psnr(sq[mask]), _psnr(sq[~mask])


def worst_edge_psnr(original: np.ndarray, reconstruction: np.ndarray, width: int = EDGE_LINE) -> float:
    """The lowest PSNR (dB) of the four ``width``-pixel strips along the image's edges."""
    sq = (_unit(reconstruction) - _unit(original)) ** 2
    if width < 1 or width > min(sq.shape[:2]):
        raise ValueError(f"edge strips of {width} pixels do not fit a {sq.shape[0]}x{sq.shape[1]} image")
    return min(_psnr(strip) for strip in (sq[:width], sq[-width:], sq[:, :width], sq[:, -width:]))


def reconstruction_metrics(original: np.ndarray, reconstruction: np.ndarray, band: int = BORDER_BAND
                           ) -> dict[str, float]:
    """All of the above as one flat dict (keys as ``klvae eval`` reports them); the border metrics are NaN for an
    image too small to have an interior."""
    err = channel_mean_error(original, reconstruction)
    if 2 * band >= min(np.shape(original)[:2]):
        border = interior = math.nan
    else:
        border, interior = border_interior_psnr(original, reconstruction, band)
    return {"colour": colour_spread_ratio(original, reconstruction),
            "chroma_err": chroma_error(original, reconstruction),
            "err_r": err[0], "err_g": err[1], "err_b": err[2],
            "psnr_border": border, "psnr_interior": interior,
            "psnr_edge_line": worst_edge_psnr(original, reconstruction)}
