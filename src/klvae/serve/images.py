"""Images in and out: PNG/JPEG bodies to model input, decoded tensors to uint8 arrays and PNG/JPEG bytes.

Only the PNG and JPEG decoders are ever offered to Pillow, and an image's size is checked against the pixel
limit from its header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from klvae.serve.errors import BadRequest, PayloadTooLarge

INPUT_FORMATS = ("PNG", "JPEG")
# Image modes per channel count, for input conversion and output images.
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# 8-bit modes Pillow converts to L/RGB/RGBA without loss of meaning; 16-bit and float images are refused.
_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"}
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 1  # fast; PNG stays lossless at any level


def image_to_tensor(data: bytes, channels: int, max_pixels: int) -> torch.Tensor:
    """A PNG or JPEG body -> (1, channels, H, W) float32 in [-1, 1] (``2 * (v / 255) - 1``, diffusers' arithmetic)."""
    from PIL import Image

    if not data:
        raise BadRequest("empty body; expected a PNG or JPEG image (or a raw tensor with 'shape' and 'dtype')")
    if channels not in MODES:
        raise BadRequest(f"this model takes {channels}-channel input; send a raw tensor with 'shape' and 'dtype'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
            if image.mode not in _CONVERTIBLE:
                raise BadRequest(f"image mode {image.mode} is not supported; send 8-bit L, RGB or RGBA")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge("the image exceeds the decompression limit") from None
    except (BadRequest, PayloadTooLarge):
        raise
    except Exception as e:  # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise BadRequest(f"the body is not a readable PNG or JPEG image ({type(e).__name__}: {e})") from None
    if image.mode in ("P", "PA") and channels == 3:
        image = image.convert("RGBA")  # palette transparency -> alpha, then dropped below
    array = np.asarray(image.convert(MODES[channels]), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float()
    return 2.0 * (x / 255.0) - 1.0


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1], clamped (float32 maths)."""
    return (x.float() / 2 + 0.5).clamp(0, 1)


def to_uint8_hwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in [-1, 1] -> (B, H, W, C) uint8, rounded (diffusers' numpy_to_pil arithmetic)."""
    return (denormalize(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def encode_image(hwc: torch.Tensor, image_format: str) -> bytes:
    """One (H, W, C) uint8 image -> PNG or JPEG bytes."""
    from PIL import Image

    channels = hwc.shape[-1]
    if channels not in MODES:
        raise BadRequest(f"the model outputs {channels} channels; images need 1, 3 or 4 (use output_type=pt)")
    if image_format == "jpg" and channels == 4:
        raise BadRequest("JPEG has no alpha channel; use image_format=png for this 4-channel model")
    array = hwc.numpy()
    image = Image.fromarray(array[:, :, 0] if channels == 1 else array)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: no chroma blur
    return buffer.getvalue()
