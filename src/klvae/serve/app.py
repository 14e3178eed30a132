"""The ASGI application: ``POST /decode``, ``POST /encode``, ``POST /roundtrip``, ``GET /`` (the page),
``GET /health`` (liveness), ``GET /ready`` (readiness), ``GET /info``, ``GET /metrics`` (Prometheus).

Every refusal is a JSON body ``{"error", "code", "status"}`` with a 4xx status (5xx only for model failures,
overload or shutdown), and no request can change what the server does next.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from klvae import __version__
from klvae.serve import images, page, protocol, roundtrip
from klvae.serve.batcher import MicroBatcher
from klvae.serve.engine import Engine
from klvae.serve.errors import BadRequest, InternalError, PayloadTooLarge, RequestError, Unavailable
from klvae.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from klvae.serve.metrics import Metrics, MetricsMiddleware
from klvae.serve.readiness import Readiness, warm_up
from klvae.serve.security import check_token, read_body
from klvae.serve.summary import model_summary

log = logging.getLogger("klvae.serve")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one server. ``max_pixels`` bounds a request's batch x height x width in image
    pixels (decode output, encode input); bodies are bounded by what that many pixels need. The token guards
    ``/metrics``, ``/health`` and ``/ready`` only with ``protect_metrics``; ``metrics=False`` turns the
    Prometheus instruments off (``/metrics`` is then 404); ``warmup=False`` is ready without a warm-up run."""

    token: str | None = None
    max_pixels: int = 4 * 2048 * 2048
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    protect_metrics: bool = False
    metrics: bool = True
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_batch < 1 or self.max_queue < 1 or self.batch_wait_ms < 0:
            raise ValueError("max_pixels, max_batch and max_queue must be >= 1, batch_wait_ms >= 0")
        if self.token is not None and not self.token:
            raise ValueError("the token must not be empty")


class Service:
    """Request handling on top of an :class:`Engine` and a :class:`MicroBatcher`."""

    def __init__(self, engine: Engine, settings: ServeSettings, metrics: Metrics | None):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        # Batch keys are (op, *item_shape): only requests of one operation and shape share a batch.
        self.batcher = MicroBatcher(self._run_batch, max_batch=settings.max_batch,
                                    max_wait_s=settings.batch_wait_ms / 1000, max_queue=settings.max_queue)
        # An image body (PNG/JPEG) may be at most the size of the largest float32 tensor accepted.
        self.max_image_bytes = settings.max_pixels * engine.config.in_channels * 4 + (1 << 16)
        self.summary = model_summary(engine.name, engine.model)
        self.readiness = Readiness()
        if metrics is not None:
            metrics.track_queue(lambda: self.batcher.queued_items)
            metrics.ready.set_function(lambda: float(self.readiness.ready))
            metrics.model_info.info({"name": engine.name, "class": self.summary["class"], "version": __version__,
                                     "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device)})

    def _run_batch(self, key: tuple, x: torch.Tensor) -> torch.Tensor:
        """One batch on the model (the model thread), timed for the metrics."""
        start = time.perf_counter()
        y = self.engine.run(key[0], x)
        if self.metrics is not None:
            self.metrics.observe_batch(key[0], x.shape[0], time.perf_counter() - start)
        return y

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        await self.batcher.start()
        warmup = asyncio.create_task(self._warm_up())
        try:
            yield
        finally:
            self.readiness.set("stopping", "the server is shutting down")
            await warmup  # it runs on the model thread, which cannot be interrupted
            await self.batcher.stop()

    async def _warm_up(self) -> None:
        if not self.settings.warmup:
            self.readiness.set("ready", "model loaded (no warm-up)")
            return
        try:
            seconds = await self.batcher.call(lambda: warm_up(self.engine))
        except Exception as e:  # stays live but not ready: the orchestrator keeps traffic away
            log.error("klvae serve: warm-up failed: %s: %s", type(e).__name__, e)
            self.readiness.set("failed", f"warm-up failed: {type(e).__name__}: {e}")
            return
        self.readiness.warmup_s = round(seconds, 3)
        if self.readiness.state == "starting":
            self.readiness.set("ready", f"model loaded and warmed up in {seconds:.2f} s")
        log.info("klvae serve: model %s ready (%s, %s; warm-up %.2f s)", self.engine.name, self.engine.device,
                 self.engine.dtype, seconds)

    # ------------------------------------------------------------------------------------------ routes
    async def health(self, request: Request) -> Response:
        self._check_ops_token(request)
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        self._check_ops_token(request)
        r = self.readiness
        return JSONResponse(r.to_json(), status_code=200 if r.ready else 503,
                            headers=None if r.ready else {"Retry-After": "1"})

    async def metrics_route(self, request: Request) -> Response:
        self._check_ops_token(request)
        data = await run_in_threadpool(self.metrics.render)
        return Response(data, media_type=METRICS_CONTENT_TYPE)

    def _check_ops_token(self, request: Request) -> None:
        if self.settings.protect_metrics:
            check_token(request, self.settings.token)

    async def info(self, request: Request) -> Response:
        check_token(request, self.settings.token)
        s = self.settings
        return JSONResponse({
            "server": "klvae", "version": __version__, "summary": self.summary, "model": self.engine.describe(),
            "ready": self.readiness.to_json(), "auth": {"token": s.token is not None},
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

    async def roundtrip(self, request: Request) -> Response:
        check_token(request, self.settings.token)
        error_scale = roundtrip.error_scale_of(request.query_params)
        body = await read_body(request, self.max_image_bytes)
        cfg, f, timer = self.engine.config, self.engine.factor, roundtrip.Timer()
        prep = await run_in_threadpool(roundtrip.prepare, body, cfg.in_channels, f, self.settings.max_pixels)
        self._check_pixels(prep.x.shape[2] * prep.x.shape[3], f"encoding a padded {list(prep.x.shape)} image")
        with timer("encode"):
            z = await self._run("encode", prep.x)
        with timer("decode"):
            decoded = await self._run("decode", z)
        result = await run_in_threadpool(roundtrip.report, prep, decoded, list(z.shape), error_scale, timer.seconds)
        return JSONResponse(result)

    # ------------------------------------------------------------------------------------------ helpers
    async def _run(self, op: str, x: torch.Tensor) -> torch.Tensor:
        try:
            return await self.batcher.submit((op, *x.shape[1:]), x)
        except RequestError:
            raise
        except torch.OutOfMemoryError:
            raise Unavailable(f"out of memory while running {op} on a batch; retry, or send smaller requests",
                              retry_after_s=2, reason="out_of_memory") from None
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
def _count_rejection(request: Request, reason: str) -> None:
    metrics = request.app.state.service.metrics
    if metrics is not None:
        metrics.reject(reason)


async def _request_error(request: Request, exc: RequestError) -> Response:
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    if exc.status < 500 or exc.status == 503:  # refused; a 500 is a failure, counted by status only
        _count_rejection(request, exc.reason)
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    _count_rejection(request, codes.get(exc.status_code, "http"))
    body = {"error": f"{request.method} {request.url.path}: {exc.detail}", "code": codes.get(exc.status_code, "http"),
            "status": exc.status_code}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})", "code": "internal", "status": 500},
                        status_code=500)


def create_app(engine: Engine, settings: ServeSettings | None = None) -> Starlette:
    """The Starlette application serving ``engine``; run it with uvicorn (see :mod:`klvae.serve.runner`)."""
    settings = settings or ServeSettings()
    routes = [("/decode", "decode", "POST"), ("/encode", "encode", "POST"), ("/roundtrip", "roundtrip", "POST"),
              ("/health", "health", "GET"), ("/ready", "ready", "GET"), ("/info", "info", "GET")]
    if settings.metrics:
        routes.append(("/metrics", "metrics_route", "GET"))
    metrics = Metrics([path for path, _, _ in routes] + ["/"]) if settings.metrics else None
    service = Service(engine, settings, metrics)
    handlers: dict[Any, Any] = {RequestError: _request_error, HTTPException: _http_error,
                                Exception: _unexpected_error}
    middleware = [Middleware(MetricsMiddleware, metrics=metrics)] if metrics is not None else []
    app = Starlette(routes=[Route(path, getattr(service, name), methods=[method]) for path, name, method in routes]
                    + [Route("/", page.index, methods=["GET"])],
                    middleware=middleware, lifespan=service.lifespan, exception_handlers=handlers)
    app.state.service = service
    return app
