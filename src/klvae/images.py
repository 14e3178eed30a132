"""Image files in and out for the command line (numpy + Pillow; no torch, no jax).

Pixels travel as ``(H, W, C)`` float32 arrays in [0, 1] with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4
(RGBA). Reading honours EXIF orientation and keeps 16-bit precision (grey, RGB and RGBA PNGs, 16-bit TIFF
grey); :func:`to_channels` adapts the channels to the model's, :func:`pad_to_multiple` pads any size to the
model's factor (the caller crops back). Writing is atomic: PNG at 8 or 16 bits, or any format Pillow writes
at 8 bits.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import warnings
import zlib

import numpy as np

from klvae.errors import KLVAEError
from klvae.fileio import atomic_write_bytes, atomic_write_with

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm")
EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow decodes 16-bit RGB(A) PNGs to 8 bits (the high bytes); decoding again with these raw modes gives
# the low bytes, so both halves of every sample are recovered.
_LOW_BYTE_RAWMODES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


class ImageError(KLVAEError):
    """An image file cannot be read or written, or its pixels do not fit the model."""


@dataclasses.dataclass
class LoadedImage:
    pixels: np.ndarray   # (H, W, C) float32 in [0, 1], upright (EXIF orientation applied)
    bits: int            # 8 or 16: the precision of the source samples
    path: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.pixels.shape[0], self.pixels.shape[1]


def pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ImageError("reading and writing images needs Pillow (pip install 'klvae[cli]')") from None
    return Image


# ---------------------------------------------------------------------------------------------- reading
def read_image(source: str | bytes, name: str | None = None) -> LoadedImage:
    """Decode an image file (a path, or the file's bytes with ``name`` for messages)."""
    import io

    Image = pillow()
    name = name or (source if isinstance(source, str) else "<bytes>")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as im:
            orientation = _orientation(im)
            pixels, bits = pixels_of(im)
            if im.format == "PNG" and bits == 8 and _png_bit_depth(source) == 16:
                wide = _decode_png16(fp)
                if wide is None:
                    warnings.warn(f"{name}: 16-bit grey+alpha PNG read at 8 bits (Pillow cannot decode more)",
                                  stacklevel=2)
                else:
                    pixels, bits = wide, 16
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image") from None
    except ImageError:
        raise
    except Exception as e:  # Pillow raises many kinds for unreadable files
        raise ImageError(f"{name}: cannot read as an image ({type(e).__name__}: {e})") from None
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageError(f"{name}: the image is empty ({pixels.shape[1]}x{pixels.shape[0]})")
    return LoadedImage(apply_orientation(pixels, orientation), bits, name)


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a corrupt EXIF block must not make the image unreadable
        return 1


def pixels_of(im) -> tuple[np.ndarray, int]:
    """Pixels of an opened Pillow image as (H, W, C) float32 in [0, 1], and the source bit depth."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im, dtype=np.uint16).astype(np.float32)[..., None] / 65535.0, 16
    if mode == "I":
        a = np.asarray(im, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"32-bit integer image with values in [{a.min()}, {a.max()}]; expected 0..65535")
        return a.astype(np.float32)[..., None] / 65535.0, 16
    if mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[..., None], 16
    if mode == "1":
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode == "La":
        im = im.convert("LA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in mode else "RGB")  # CMYK, YCbCr, LAB, HSV, RGBa, ...
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    return a.astype(np.float32) / 255.0, 8


def _png_bit_depth(source: str | bytes) -> int:
    """The bit depth in a PNG's header (8 for anything else)."""
    if isinstance(source, bytes):
        head = source[:26]
    else:
        with open(source, "rb") as f:
            head = f.read(26)
    return head[24] if head[:8] == _PNG_SIGNATURE and len(head) >= 26 else 8


def _decode_png16(fp) -> np.ndarray | None:
    """All 16 bits of a 16-bit RGB or RGBA PNG, or None for layouts this cannot do (grey + alpha)."""
    Image = pillow()
    halves = []
    for low in (False, True):
        if hasattr(fp, "seek"):
            fp.seek(0)
        with Image.open(fp) as im:  # lazy: nothing is decoded until the tiles are set
            tiles = []
            for tile in im.tile:
                raw = tile.args if isinstance(tile.args, str) else tile.args[0]
                if raw not in _LOW_BYTE_RAWMODES:
                    return None
                if low:
                    new = _LOW_BYTE_RAWMODES[raw]
                    tile = tile._replace(args=new if isinstance(tile.args, str) else (new, *tile.args[1:]))
                tiles.append(tile)
            im.tile = tiles
            halves.append(np.asarray(im, dtype=np.uint8).astype(np.uint16))
    return (halves[0] * 256 + halves[1]).astype(np.float32) / 65535.0


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn (H, W, C) pixels upright according to an EXIF orientation tag (1..8)."""
    turns = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    f = turns.get(orientation)
    return np.ascontiguousarray(f(pixels)) if f else pixels


# ---------------------------------------------------------------------------------------------- adapting
def to_channels(pixels: np.ndarray, channels: int, name: str = "image") -> np.ndarray:
    """(H, W, C) pixels with the model's channel count: grey is repeated to RGB, RGB becomes grey by ITU-R
    601 luma (as Pillow's ``convert("L")``), alpha is composited over white unless the model takes 4 or 2
    channels, and a missing alpha is opaque."""
    c = pixels.shape[-1]
    if c == channels:
        return pixels
    colour, alpha = (pixels[..., :-1], pixels[..., -1:]) if c in (2, 4) else (pixels, None)
    if channels in (2, 4):
        alpha = np.ones_like(pixels[..., :1]) if alpha is None else alpha
        return np.concatenate([_colour(colour, channels - 1, name), alpha], axis=-1)
    if alpha is not None:
        colour = colour * alpha + (1.0 - alpha)
    return _colour(colour, channels, name)


def _colour(colour: np.ndarray, channels: int, name: str) -> np.ndarray:
    c = colour.shape[-1]
    if c == channels:
        return colour
    if channels == 3 and c == 1:
        return np.repeat(colour, 3, axis=-1)
    if channels == 1 and c == 3:
        return (colour @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    raise ImageError(f"{name}: has {c} colour channel(s); the model takes {channels}")


def pad_to_multiple(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Pad (H, W, C) pixels at the bottom and right, mirroring the edge, to multiples of ``factor``."""
    h, w = pixels.shape[:2]
    ph, pw = -h % factor, -w % factor
    if not ph and not pw:
        return pixels
    mode = "symmetric" if min(h, w) > 1 else "edge"
    return np.pad(pixels, ((0, ph), (0, pw), (0, 0)), mode=mode)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (C, H, W) float32 in [-1, 1]."""
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) * 2.0 - 1.0


def from_model_output(sample: np.ndarray) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) float32 in [0, 1], clipped."""
    return np.clip((np.asarray(sample, dtype=np.float32).transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0)


def quantize(pixels: np.ndarray, bits: int = 8) -> np.ndarray:
    """[0, 1] floats -> uint8 (bits=8) or uint16 (bits=16), rounded to nearest."""
    top = 255 if bits == 8 else 65535
    return np.round(np.clip(pixels, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)


# ---------------------------------------------------------------------------------------------- writing
def write_image(path: str, pixels: np.ndarray, bits: int = 8) -> None:
    """Write (H, W, C) pixels in [0, 1] atomically. 16 bits needs a ``.png`` path; other formats follow the
    suffix (``.png``, ``.jpg``, ``.webp``, ...)."""
    if bits not in (8, 16):
        raise ImageError(f"{path}: bits must be 8 or 16, got {bits}")
    c = pixels.shape[-1]
    if bits == 16:
        if not path.lower().endswith(".png"):
            raise ImageError(f"{path}: 16-bit images are written as PNG; use a .png name")
        atomic_write_bytes(path, encode_png(quantize(pixels, 16)))
        return
    Image = pillow()
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c]
    im = Image.fromarray(quantize(pixels, 8)[..., 0] if c == 1 else quantize(pixels, 8), mode=mode)
    if path.lower().endswith((".jpg", ".jpeg")) and c in (2, 4):
        raise ImageError(f"{path}: JPEG has no alpha channel; use .png")
    try:
        fmt = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
    except KeyError:
        raise ImageError(f"{path}: unknown image type {os.path.splitext(path)[1]!r}; use .png") from None
    atomic_write_with(path, lambda tmp: im.save(tmp, format=fmt))


def encode_png(samples: np.ndarray, filter_type: int = 1, compression: int = 6) -> bytes:
    """A PNG file of (H, W, C) uint8 or uint16 samples, C in 1..4; every row uses ``filter_type`` (0 None,
    1 Sub, 2 Up, 3 Average, 4 Paeth). Pillow cannot write 16-bit colour PNGs, so this does."""
    if samples.ndim != 3 or not 1 <= samples.shape[-1] <= 4 or samples.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"cannot write samples of shape {samples.shape} and dtype {samples.dtype} as PNG")
    h, w, c = samples.shape
    bits = 8 * samples.dtype.itemsize
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = samples.astype(">u2" if bits == 16 else np.uint8).reshape(h, -1).view(np.uint8).astype(np.int32)
    filtered = _png_filter(raw, filter_type, c * bits // 8)
    data = np.concatenate([np.full((h, 1), filter_type, np.uint8), filtered], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (_PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(data.tobytes(), compression)) + chunk(b"IEND", b""))


def _png_filter(raw: np.ndarray, kind: int, bpp: int) -> np.ndarray:
    """Filter (H, row_bytes) byte rows (int32) with one PNG filter type; returns uint8."""
    left = np.pad(raw, ((0, 0), (bpp, 0)))[:, :-bpp]
    up = np.pad(raw, ((1, 0), (0, 0)))[:-1]
    if kind == 0:
        pred = np.zeros_like(raw)
    elif kind == 1:
        pred = left
    elif kind == 2:
        pred = up
    elif kind == 3:
        pred = (left + up) // 2
    elif kind == 4:
        upleft = np.pad(raw, ((1, 0), (bpp, 0)))[:-1, :-bpp]
        p = left + up - upleft
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    else:
        raise ValueError(f"PNG filter type must be 0..4, got {kind}")
    return ((raw - pred) % 256).astype(np.uint8)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)
