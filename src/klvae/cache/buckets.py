"""Aspect-ratio buckets, as diffusion training pipelines use them (SDXL, kohya-ss, SimpleTuner).

Buckets are (height, width) sizes in multiples of ``step`` pixels whose area is at most ``resolution ** 2``
(each as large as the step allows) and whose aspect ratio is at most ``max_aspect``. An image goes to the
bucket whose aspect ratio is nearest its own (in log space), is resized to cover it exactly on one side, and
is centre-cropped on the other. The index records the source size, the resized size and the crop, which is
what SDXL's size and crop conditioning needs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from klvae.errors import KLVAEError


class BucketError(KLVAEError):
    """Bucket settings that give no usable bucket."""


@dataclasses.dataclass(frozen=True)
class Placement:
    bucket: tuple[int, int]     # (height, width) of the encoded image
    resized: tuple[int, int]    # (height, width) after resizing the (upright) source
    crop: tuple[int, int]       # (top, left) of the bucket inside the resized image


def make_buckets(resolution: int, step: int, max_aspect: float, aspect_buckets: bool = True) -> list[tuple[int, int]]:
    """The bucket sizes, sorted; with ``aspect_buckets`` false, the one square bucket."""
    if resolution < step or resolution % step:
        raise BucketError(f"--resolution {resolution} must be a positive multiple of --bucket-step {step}")
    if not aspect_buckets:
        return [(resolution, resolution)]
    if max_aspect < 1:
        raise BucketError(f"--max-aspect must be at least 1, got {max_aspect}")
    area = resolution * resolution
    sizes = set()
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            sizes.add((h, w))
            sizes.add((w, h))
    # keep, for each aspect ratio, only the largest size (a thin bucket can shadow a larger one after rounding)
    best: dict[float, tuple[int, int]] = {}
    for h, w in sizes:
        key = round(w / h, 6)
        if key not in best or h * w > best[key][0] * best[key][1]:
            best[key] = (h, w)
    return sorted(best.values())


def place(height: int, width: int, buckets: list[tuple[int, int]]) -> Placement:
    """The bucket for an image of (height, width), and how it is resized and cropped into it."""
    ratio = math.log(width / height)
    bh, bw = min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))
    scale = max(bh / height, bw / width)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    return Placement(bucket=(bh, bw), resized=(rh, rw), crop=((rh - bh) // 2, (rw - bw) // 2))


def resize_and_crop(im, placement: Placement):
    """A Pillow image resized (Lanczos, with JPEG draft decoding when it shrinks a lot) and cropped."""
    from PIL import Image

    rh, rw = placement.resized
    if im.size != (rw, rh):
        im = im.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    top, left = placement.crop
    bh, bw = placement.bucket
    return im.crop((left, top, left + bw, top + bh))


def to_array(im, channels: int) -> np.ndarray:
    """A Pillow image (mode L or RGB/RGBA as ``channels`` asks) as (C, H, W) float32 in [-1, 1]."""
    a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    return np.ascontiguousarray(a.transpose(2, 0, 1)) / 127.5 - 1.0


def load_into_bucket(data, buckets: list[tuple[int, int]], channels: int, name: str):
    """Decode an image (a path or a binary file object), turn it upright, and resize and crop it into its
    bucket: ``((C, H, W) float32 in [-1, 1], placement, (source height, source width))``."""
    from PIL import Image, ImageOps

    with Image.open(data) as im:
        orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "PNG", "WEBP", "TIFF") else 1
        w, h = im.size
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        placement = place(h, w, buckets)
        if im.format == "JPEG":  # decode at a reduced scale that still covers the resized size
            rh, rw = placement.resized
            im.draft("L" if channels == 1 else "RGB", (rh, rw) if orientation in (5, 6, 7, 8) else (rw, rh))
        im = _with_channels(ImageOps.exif_transpose(im), channels, name)
        return to_array(resize_and_crop(im, placement), channels), placement, (h, w)


def _with_channels(im, channels: int, name: str):
    from PIL import Image

    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        from klvae.images import pixels_of, quantize

        pixels, _ = pixels_of(im)
        im = Image.fromarray(quantize(pixels, 8)[..., 0], mode="L")
    if channels == 4:
        return im.convert("RGBA")
    if channels not in (1, 3):
        raise BucketError(f"{name}: the cache encodes 1-, 3- or 4-channel images; the model takes {channels}")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("L" if channels == 1 else "RGB")
