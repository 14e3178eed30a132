"""The ASGI application: ``POST /decode``, ``POST /encode``, ``GET /health``, ``GET /info``.

Every refusal is a JSON body ``{"error", "code", "status"}`` with a 4xx status (5xx only for model failures,
overload or shutdown), and no request can change what the server does next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from klvae import __version__
from klvae.serve import images, protocol
from klvae.serve.batcher import MicroBatcher
from klvae.serve.engine import Engine
from klvae.serve.errors import BadRequest, InternalError, PayloadTooLarge, RequestError, Unavailable
from klvae.serve.security import check_token, read_body

log = logging.getLogger("klvae.serve")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one server. ``max_pixels`` bounds a request's batch x height x width in image
    pixels (decode output, encode input); bodies are bounded by what that many pixels need."""

    token: str | None = None
    max_pixels: int = 4 * 2048 * 2048
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 64

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_batch < 1 or self.max_queue < 1 or self.batch_wait_ms < 0:
            raise ValueError("max_pixels, max_batch and max_queue must be >= 1, batch_wait_ms >= 0")
        if self.token is not None and not self.token:
            raise ValueError("the token must not be empty")


class Service:
    """Request handling on top of an :class:`Engine` and a :class:`MicroBatcher`."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        # Batch keys are (op, *item_shape): only requests of one operation and shape share a batch.
        self.batcher = MicroBatcher(lambda key, x: engine.run(key[0], x), max_batch=settings.max_batch,
                                    max_wait_s=settings.batch_wait_ms / 1000, max_queue=settings.max_queue)
        # An image body (PNG/JPEG) may be at most the size of the largest float32 tensor accepted.
        self.max_image_bytes = settings.max_pixels * engine.config.in_channels * 4 + (1 << 16)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        await self.batcher.start()
        log.info("klvae serve: model ready (%s, %s)", self.engine.device, self.engine.dtype)
        try:
            yield
        finally:
            await self.batcher.stop()

    # ------------------------------------------------------------------------------------------ routes
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        check_token(request, self.settings.token)
        s = self.settings
        return JSONResponse({
            "server": "klvae", "version": __version__, "model": self.engine.describe(),
            "limits": {"max_pixels": s.max_pixels, "max_image_bytes": self.max_image_bytes},
            "batching": {"max_batch": s.max_batch, "batch_wait_ms": s.batch_wait_ms, "max_queue": s.max_queue,
                         "queued_items": self.batcher.queued_items, **self.batcher.stats.to_dict()},
            "protocol": {"input_dtypes": list(protocol.INPUT_DTYPES), "output_types": ["pt", "pil"],
                         "image_formats": list(protocol.IMAGE_MEDIA_TYPES)},
        })

    async def decode(self, request: Request) -> Response:
        check_token(request, self.settings.token)
        req = protocol.parse_decode_request(request.query_params, request.headers.get("accept", ""))
        spec, cfg, f = req.tensor, self.engine.config, self.engine.factor
        channels = cfg.latent_channels
        if len(spec.shape) == 3:  # FLUX-packed (B, patches, 4 * C)
            if req.height is None:
                raise BadRequest("packed latents (3 dimensions) need the image's 'height' and 'width'")
            h, w = 2 * (req.height // (2 * f)), 2 * (req.width // (2 * f))
            expected = (spec.shape[0], (h // 2) * (w // 2), 4 * channels)
            if h == 0 or w == 0 or spec.shape != expected:
                raise BadRequest(f"packed latents of shape {list(spec.shape)} do not fit a {req.height}x{req.width} "
                                 f"image on this model: expected {list(expected)}")
        elif len(spec.shape) == 4:
            _, c, h, w = spec.shape
            patch = self.engine.scaling.patch_size
            if patch and c == channels * patch[0] * patch[1]:  # FLUX.2's transformer latents
                h, w = h * patch[0], w * patch[1]
            elif c != channels:
                raise BadRequest(f"latents of shape {list(spec.shape)}: this model has {channels} latent channels"
                                 + (f" ({channels * patch[0] * patch[1]} patchified)" if patch else ""))
        else:
            raise BadRequest(f"latents must be (batch, {channels}, height, width), or packed with 3 dimensions; "
                             f"got shape {list(spec.shape)}")
        batch = spec.shape[0]
        self._check_pixels(batch * h * f * w * f, f"decoding {list(spec.shape)}")
        if req.output == "image" and batch != 1:
            raise BadRequest(f"output_type=pil returns one image, but the batch has {batch}; send one latent at a "
                             "time or use output_type=pt with partial_postprocess=true")
        body = await read_body(request, spec.nbytes, exact=spec.nbytes)
        z = protocol.tensor_from_bytes(body, spec)
        z = protocol.latents_for_decode(z, req, cfg, self.engine.scaling, f)
        out = await self._run("decode", z)
        return await run_in_threadpool(self._decode_response, out, req)

    async def encode(self, request: Request) -> Response:
        check_token(request, self.settings.token)
        req = protocol.parse_encode_request(request.query_params)
        channels, f = self.engine.config.in_channels, self.engine.factor
        if req.tensor is not None:
            spec = req.tensor
            if len(spec.shape) != 4 or spec.shape[1] != channels:
                raise BadRequest(f"images must be (batch, {channels}, height, width) in [-1, 1]; got shape "
                                 f"{list(spec.shape)}")
            self._check_pixels(spec.shape[0] * spec.shape[2] * spec.shape[3], f"encoding {list(spec.shape)}")
            self._check_multiple(spec.shape[2], spec.shape[3], f)
            body = await read_body(request, spec.nbytes, exact=spec.nbytes)
            x = protocol.tensor_from_bytes(body, spec).float()
            out_dtype = spec.dtype
        else:
            body = await read_body(request, self.max_image_bytes)
            x = await run_in_threadpool(images.image_to_tensor, body, channels, self.settings.max_pixels)
            self._check_multiple(x.shape[2], x.shape[3], f)
            out_dtype = self.engine.dtype
        z = await self._run("encode", x)
        z = protocol.scale_after_encode(z.float(), req).to(out_dtype)
        data, headers = protocol.tensor_to_bytes(z)
        return Response(data, media_type=protocol.TENSOR_MEDIA_TYPE, headers=headers)

    # ------------------------------------------------------------------------------------------ helpers
    async def _run(self, op: str, x: torch.Tensor) -> torch.Tensor:
        try:
            return await self.batcher.submit((op, *x.shape[1:]), x)
        except RequestError:
            raise
        except torch.OutOfMemoryError:
            raise Unavailable(f"out of memory while running {op} on a batch; retry, or send smaller requests",
                              retry_after_s=2) from None
        except Exception as e:
            raise InternalError(f"{op} failed: {type(e).__name__}: {e}") from None

    def _check_pixels(self, pixels: int, what: str) -> None:
        if pixels > self.settings.max_pixels:
            raise PayloadTooLarge(f"{what} means {pixels} pixels; the server's limit is {self.settings.max_pixels} "
                                  "(batch x height x width)")

    @staticmethod
    def _check_multiple(height: int, width: int, f: int) -> None:
        if height % f or width % f:
            raise BadRequest(f"image of {width}x{height}: width and height must be multiples of {f} for this model")

    @staticmethod
    def _decode_response(out: torch.Tensor, req: protocol.DecodeRequest) -> Response:
        if req.output == "image":
            data = images.encode_image(images.to_uint8_hwc(out)[0], req.image_format)
            return Response(data, media_type=protocol.IMAGE_MEDIA_TYPES[req.image_format])
        if req.output == "uint8":
            tensor = images.to_uint8_hwc(out)
        elif req.output == "unit_tensor":
            tensor = images.denormalize(out).to(req.tensor.dtype)
        else:
            tensor = out.to(req.tensor.dtype)
        data, headers = protocol.tensor_to_bytes(tensor)
        return Response(data, media_type=protocol.TENSOR_MEDIA_TYPE, headers=headers)


# ---------------------------------------------------------------------------------------------- errors
async def _request_error(request: Request, exc: RequestError) -> Response:
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    body = {"error": f"{request.method} {request.url.path}: {exc.detail}", "code": codes.get(exc.status_code, "http"),
            "status": exc.status_code}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})", "code": "internal", "status": 500},
                        status_code=500)


def create_app(engine: Engine, settings: ServeSettings | None = None) -> Starlette:
    """The Starlette application serving ``engine``; run it with uvicorn (see :mod:`klvae.serve.runner`)."""
    service = Service(engine, settings or ServeSettings())
    routes = [Route("/decode", service.decode, methods=["POST"]), Route("/encode", service.encode, methods=["POST"]),
              Route("/health", service.health, methods=["GET"]), Route("/info", service.info, methods=["GET"])]
    handlers: dict[Any, Any] = {RequestError: _request_error, HTTPException: _http_error,
                                Exception: _unexpected_error}
    app = Starlette(routes=routes, lifespan=service.lifespan, exception_handlers=handlers)
    app.state.service = service
    return app
