"""``POST /roundtrip``: encode and decode one image, and say how close it came back (what the page shows).

The body is a PNG or JPEG image of any size: it is padded (mirrored) to the model's factor, encoded (the
posterior's mode), decoded, cropped back and rounded to 8 bits, as ``klvae roundtrip`` does. The JSON answer
holds the image as the model saw it, the reconstruction and an error heat map (PNG data URLs), PSNR (dB) and
SSIM over the whole image (:mod:`klvae.cli.quality`, the same numbers as ``klvae roundtrip``), and the latent
shape. ``error_scale`` (default 0.1) is the absolute error, on the [0, 1] scale, shown at full brightness.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import time

import numpy as np
import torch

from klvae.cli.quality import error_heatmap, psnr, ssim
from klvae.images import pad_to_multiple, quantize, to_model_input
from klvae.serve import images, protocol
from klvae.serve.errors import BadRequest

DEFAULT_ERROR_SCALE = 0.1


@dataclasses.dataclass
class Prepared:
    original: np.ndarray  # (H, W, C) float32 in [0, 1], as the model sees it (8-bit values)
    x: torch.Tensor       # (1, C, H', W') model input, padded to the factor


def error_scale_of(params) -> float:
    scale = protocol.parse_float(params, "error_scale")
    if scale is None:
        return DEFAULT_ERROR_SCALE
    if not 0 < scale <= 1:
        raise BadRequest(f"error_scale={scale:g} must be in (0, 1]")
    return scale


def prepare(body: bytes, channels: int, factor: int, max_pixels: int) -> Prepared:
    """Decode the image (size-checked from its header) and pad it to the factor. Blocking (CPU work)."""
    x = images.image_to_tensor(body, channels, max_pixels)
    original = quantize((x[0].permute(1, 2, 0).numpy() + 1.0) / 2.0, 8).astype(np.float32) / 255.0  # exact v/255
    return Prepared(original, torch.from_numpy(to_model_input(pad_to_multiple(original, factor))[None]))


def report(prep: Prepared, decoded: torch.Tensor, latent_shape: list[int], error_scale: float,
           seconds: dict[str, float]) -> dict[str, object]:
    """Crop and round the reconstruction, measure it, and render the three panels. Blocking (CPU work)."""
    h, w, c = prep.original.shape
    recon8 = quantize(((decoded[0].float().permute(1, 2, 0).numpy() + 1.0) / 2.0)[:h, :w], 8)
    recon = recon8.astype(np.float32) / 255.0
    heat = quantize(error_heatmap(prep.original, recon, error_scale), 8)
    p, s = psnr(prep.original, recon), ssim(prep.original, recon)
    return {
        "width": w, "height": h, "channels": c, "latent_shape": latent_shape,
        "psnr": p if math.isfinite(p) else None, "ssim": None if math.isnan(s) else s,
        "error_scale": error_scale, "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "original": _png_data_url(quantize(prep.original, 8)), "reconstruction": _png_data_url(recon8),
        "error_map": _png_data_url(heat),
    }


def _png_data_url(hwc: np.ndarray) -> str:
    data = images.encode_image(torch.from_numpy(np.ascontiguousarray(hwc)), "png")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


class Timer:
    """``with timer("encode"): ...`` records wall seconds per step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str) -> Timer:
        self._step = step
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._step] = time.perf_counter() - self._start
