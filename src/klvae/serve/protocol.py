"""The wire protocol of diffusers' remote VAE client (``diffusers.utils.remote_utils``), server side.

Requests carry a raw tensor (C-order, little-endian bytes) in the body, described by query parameters:
``shape`` as repeated keys (``shape=1&shape=4&shape=64&shape=64``) and ``dtype`` (``float16``, ``float32``,
``bfloat16``). Tensor responses carry the same raw bytes, with ``shape`` (a JSON list) and ``dtype`` headers.

Decode options: ``scaling_factor``/``shift_factor`` (latents are mapped ``z / scaling_factor + shift_factor``
before decoding; the deprecated ``do_scaling=True`` without factors uses the model's own config),
``output_type`` (``pt`` or ``pil``), ``partial_postprocess`` (with ``pt``: uint8 images, batch x height x width x
channels), ``image_format`` (``png``/``jpg``, with ``pil``), ``height``/``width`` (packed latents, FLUX style).
FLUX.2 models also take their transformer's normalised latents (see :func:`latents_for_decode`).
Encode options: ``scaling_factor``/``shift_factor`` (latents mapped ``(z - shift_factor) * scaling_factor``).

Everything here is parsing and arithmetic on bytes: nothing a request sends is unpickled, evaluated or used
as a path.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import torch

from klvae.latents import LatentScaling, unscale_latents
from klvae.serve.errors import BadRequest, PayloadTooLarge

# Tensor dtypes accepted in requests (what the client's DTYPE_MAP reads back, uint8 aside).
INPUT_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32,
                                        "bfloat16": torch.bfloat16}
OUTPUT_DTYPES: dict[torch.dtype, str] = {v: k for k, v in INPUT_DTYPES.items()} | {torch.uint8: "uint8"}
TENSOR_MEDIA_TYPE = "tensor/binary"
IMAGE_MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg"}
MAX_DIMS = 5
MAX_DIM_SIZE = 1 << 24

# What a decode returns:
#   tensor      output_type=pt: the decoded images, (B, C, H, W) in [-1, 1], in the request's dtype;
#   uint8       output_type=pt, partial_postprocess: uint8 images, (B, H, W, C);
#   image       output_type=pil: one PNG or JPEG;
#   unit_tensor output_type=pil with Accept: tensor/binary (the client's "processor" path): (B, C, H, W) in [0, 1].
DecodeOutput = Literal["tensor", "uint8", "image", "unit_tensor"]


class Params(Protocol):
    """Query parameters as Starlette's ``QueryParams`` gives them: a multi-dict."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def getlist(self, key: str) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A request tensor's shape and dtype, as sent in the query string."""

    shape: tuple[int, ...]
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return INPUT_DTYPES[self.dtype_name]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class DecodeRequest:
    tensor: TensorSpec
    output: DecodeOutput
    image_format: str
    scaling_factor: float | None
    shift_factor: float | None
    do_scaling: bool
    height: int | None
    width: int | None


@dataclasses.dataclass(frozen=True)
class EncodeRequest:
    tensor: TensorSpec | None  # None: the body is a PNG or JPEG image
    scaling_factor: float | None
    shift_factor: float | None


# ---------------------------------------------------------------------------------------------- parsing
def parse_decode_request(params: Params, accept: str = "") -> DecodeRequest:
    spec = parse_tensor_spec(params)
    if spec is None:
        raise BadRequest("decode needs the latents' 'shape' (repeated: shape=1&shape=4&...) and 'dtype' "
                         "query parameters")
    output_type = _choice(params, "output_type", ("pt", "pil", "mp4"), "pil")
    if output_type == "mp4":
        raise BadRequest("output_type=mp4 is for video models; this server decodes images (use pt or pil)")
    image_format = _choice(params, "image_format", ("png", "jpg", "jpeg"), "jpg").replace("jpeg", "jpg")
    partial = parse_bool(params, "partial_postprocess", False)
    if output_type == "pt":
        output: DecodeOutput = "uint8" if partial else "tensor"
    else:
        output = "unit_tensor" if TENSOR_MEDIA_TYPE in accept else "image"
    height, width = parse_int(params, "height"), parse_int(params, "width")
    if (height is None) != (width is None):
        raise BadRequest("'height' and 'width' go together (they describe packed latents' image size)")
    return DecodeRequest(tensor=spec, output=output, image_format=image_format,
                         scaling_factor=parse_float(params, "scaling_factor", nonzero=True),
                         shift_factor=parse_float(params, "shift_factor"),
                         do_scaling=parse_bool(params, "do_scaling", False), height=height, width=width)


def parse_encode_request(params: Params) -> EncodeRequest:
    return EncodeRequest(tensor=parse_tensor_spec(params),
                         scaling_factor=parse_float(params, "scaling_factor", nonzero=True),
                         shift_factor=parse_float(params, "shift_factor"))


def parse_tensor_spec(params: Params) -> TensorSpec | None:
    """The ``shape``/``dtype`` pair, or None when neither is given. ``shape`` may also be one JSON list."""
    raw_shape, dtype = params.getlist("shape"), params.get("dtype")
    if not raw_shape and dtype is None:
        return None
    if not raw_shape:
        raise BadRequest("'dtype' was given without 'shape'")
    if dtype is None:
        raise BadRequest("'shape' was given without 'dtype'")
    if dtype not in INPUT_DTYPES:
        raise BadRequest(f"unknown dtype {_show(dtype)}; supported: {', '.join(INPUT_DTYPES)}")
    if len(raw_shape) == 1 and raw_shape[0].lstrip().startswith("["):
        try:
            raw_shape = [str(v) for v in json.loads(raw_shape[0])]
        except (ValueError, TypeError):
            raise BadRequest(f"shape {_show(raw_shape[0])} is not a JSON list of integers") from None
    if not 1 <= len(raw_shape) <= MAX_DIMS:
        raise BadRequest(f"shape must have 1 to {MAX_DIMS} dimensions, got {len(raw_shape)}")
    shape = tuple(_int(v, "shape", minimum=1) for v in raw_shape)
    return TensorSpec(shape=shape, dtype_name=dtype)


def parse_float(params: Params, name: str, *, nonzero: bool = False) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        raise BadRequest(f"{name}={_show(value)} is not a number") from None
    if not math.isfinite(x) or (nonzero and x == 0):
        raise BadRequest(f"{name}={_show(value)} must be a finite{' non-zero' if nonzero else ''} number")
    return x


def parse_int(params: Params, name: str) -> int | None:
    value = params.get(name)
    return None if value is None else _int(value, name, minimum=1)


def parse_bool(params: Params, name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no", "none"):
        return False
    raise BadRequest(f"{name}={_show(value)} is not a boolean (true or false)")


def _choice(params: Params, name: str, allowed: tuple[str, ...], default: str) -> str:
    value = params.get(name, default)
    if value.lower() not in allowed:
        raise BadRequest(f"{name}={_show(value)} is not supported; use one of {', '.join(allowed)}")
    return value.lower()


def _int(value: str, name: str, minimum: int) -> int:
    try:
        x = int(value.strip())
    except ValueError:
        raise BadRequest(f"{name}: {_show(value)} is not an integer") from None
    if x < minimum:
        raise BadRequest(f"{name}: {x} is below {minimum}")
    if x > MAX_DIM_SIZE:
        raise PayloadTooLarge(f"{name}: {x} exceeds {MAX_DIM_SIZE}")
    return x


def _show(value: str, limit: int = 40) -> str:
    """A request value quoted for an error message, cut short."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


# ---------------------------------------------------------------------------------------------- tensors
def tensor_from_bytes(body: bytes, spec: TensorSpec) -> torch.Tensor:
    """The request tensor (CPU) from its raw bytes, checking the byte count and finiteness."""
    if not body:
        raise BadRequest(f"empty body; expected {spec.nbytes} bytes for shape {list(spec.shape)} {spec.dtype_name}")
    if len(body) != spec.nbytes:
        raise BadRequest(f"body has {len(body)} bytes; shape {list(spec.shape)} of {spec.dtype_name} needs "
                         f"{spec.nbytes}")
    x = torch.frombuffer(bytearray(body), dtype=spec.dtype).reshape(spec.shape)
    if not torch.isfinite(x).all():
        raise BadRequest("the tensor contains NaN or infinite values")
    return x


def tensor_to_bytes(x: torch.Tensor) -> tuple[bytes, dict[str, str]]:
    """Raw bytes of ``x`` and the ``shape``/``dtype`` headers the client reads them back with."""
    if x.dtype not in OUTPUT_DTYPES:
        raise TypeError(f"cannot send a {x.dtype} tensor; the client reads {', '.join(OUTPUT_DTYPES.values())}")
    x = x.detach().cpu().contiguous()
    data = x.reshape(-1).view(torch.uint8).numpy().tobytes()
    return data, {"shape": json.dumps(list(x.shape)), "dtype": OUTPUT_DTYPES[x.dtype]}


def unpack_latents(x: torch.Tensor, height: int, width: int, factor: int, channels: int) -> torch.Tensor:
    """FLUX-packed latents (B, (h/2)*(w/2), 4*C) for a height x width image -> (B, C, h, w).

    ``h = 2 * (height // (2 * factor))`` (likewise ``w``): 2x2 latent patches were flattened channel-major.
    """
    if x.ndim != 3:
        raise BadRequest(f"packed latents must have 3 dimensions (batch, patches, channels); got {list(x.shape)}")
    h, w = 2 * (height // (2 * factor)), 2 * (width // (2 * factor))
    batch, patches, packed = x.shape
    if h == 0 or w == 0 or packed != 4 * channels or patches != (h // 2) * (w // 2):
        raise BadRequest(f"packed latents of shape {list(x.shape)} do not fit a {height}x{width} image: expected "
                         f"(batch, {max(h // 2, 0) * max(w // 2, 0)}, {4 * channels})")
    x = x.view(batch, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, channels, h, w)


def latents_for_decode(z: torch.Tensor, req: DecodeRequest, config: Mapping[str, Any], scaling: LatentScaling,
                       factor: int) -> torch.Tensor:
    """The request's latents as ``decode`` takes them: unpacked, then unscaled as the client asks.

    FLUX.2 (``scaling.patch_size`` set): raw latents (B, C, h, w) decode as they are; the transformer's latents,
    normalised and patchified (B, 4C, h/2, w/2) or packed as its pipeline's ``output_type="latent"`` returns them
    (B, h/2 * w/2, 4C, with ``height``/``width``), are denormalised with the model's own BatchNorm statistics and
    unpatchified first. Its latents have no ``scaling_factor``/``shift_factor``.
    """
    if scaling.patch_size is None:
        if z.ndim == 3:
            z = unpack_latents(z, req.height, req.width, factor, config["latent_channels"])
        return unscale_for_decode(z.float(), req, config)
    if req.scaling_factor is not None or req.shift_factor is not None:
        raise BadRequest("FLUX.2's latents have no scaling_factor/shift_factor: send raw latents (C channels) or "
                         "the transformer's normalised ones (4C channels, or packed); the server applies the "
                         "model's own statistics")
    z = z.float()
    if z.ndim == 3:  # tokens row by row, each the 4C channels of one 2x2 patch
        ph, pw = scaling.patch_size
        z = z.reshape(z.shape[0], req.height // (ph * factor), req.width // (pw * factor), z.shape[2])
        z = z.permute(0, 3, 1, 2)
    return z if z.shape[1] == config["latent_channels"] else scaling.unscale(z)


def unscale_for_decode(z: torch.Tensor, req: DecodeRequest, config: Mapping[str, Any]) -> torch.Tensor:
    """Undo the pipeline's latent scaling as the client asks: ``z / scaling_factor + shift_factor``."""
    if req.scaling_factor is None and req.shift_factor is None:
        return unscale_latents(z, config) if req.do_scaling else z
    if req.scaling_factor is not None:
        z = z / req.scaling_factor
    if req.shift_factor is not None:
        z = z + req.shift_factor
    return z


def scale_after_encode(z: torch.Tensor, req: EncodeRequest) -> torch.Tensor:
    """Apply the pipeline's latent scaling as the client asks: ``(z - shift_factor) * scaling_factor``."""
    if req.shift_factor is not None:
        z = z - req.shift_factor
    if req.scaling_factor is not None:
        z = z * req.scaling_factor
    return z
