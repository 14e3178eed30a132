"""Prometheus metrics of one server, exposed at ``GET /metrics`` in the text exposition format.

Each app has its own registry (several servers in one process do not mix their numbers). Routes are labelled
by the app's own paths, anything else as ``other``, so a scanner probing random URLs cannot grow the label set.

    klvae_requests_total{route,status}           requests answered
    klvae_request_duration_seconds{route}        time from the request's arrival to the end of its response
    klvae_model_compute_seconds{op}              time the model spent on one batch (encode or decode)
    klvae_batch_size{op}                         items per batch run on the model
    klvae_queue_depth                            items waiting for the model
    klvae_requests_in_flight                     requests being handled (``/metrics`` itself not counted)
    klvae_rejected_requests_total{reason}        requests refused (4xx, 503), by reason
    klvae_ready                                  1 when the model is loaded and warmed (see ``/ready``)
    klvae_model_info{...}                        the model served (name, class, dtype, device, klvae version)
plus the standard ``process_*`` (CPU seconds, resident memory, open files) and ``python_info`` series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector, generate_latest)

# The classic text format, which every Prometheus version reads (all names here are plain ASCII).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER_ROUTE = "other"
METRICS_ROUTE = "/metrics"
# Request latency: from a health check (~1 ms) to a large decode on a CPU (a minute).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MODEL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's instruments, in a registry of their own."""

    def __init__(self, routes: Iterable[str], *, process: bool = True):
        self.routes = frozenset(routes)
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("klvae_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("klvae_request_duration_seconds", "Time to answer a request, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_seconds = Histogram("klvae_model_compute_seconds", "Time the model spent on one batch",
                                       ["op"], buckets=MODEL_BUCKETS, registry=r)
        self.batch_size = Histogram("klvae_batch_size", "Items per batch run on the model", ["op"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("klvae_queue_depth", "Items waiting for the model", registry=r)
        self.in_flight = Gauge("klvae_requests_in_flight", "Requests being handled (scrapes of /metrics excluded)",
                               registry=r)
        self.rejected = Counter("klvae_rejected_requests", "Requests refused (4xx and 503), by reason", ["reason"],
                                registry=r)
        self.ready = Gauge("klvae_ready", "1 when the model is loaded and warmed and the server takes work",
                           registry=r)
        self.model_info = Info("klvae_model", "The model this server runs", registry=r)
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def route(self, path: str) -> str:
        return path if path in self.routes else OTHER_ROUTE

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from ``depth()`` at each scrape."""
        self.queue_depth.set_function(depth)

    def observe_batch(self, op: str, items: int, seconds: float) -> None:
        self.model_seconds.labels(op).observe(seconds)
        self.batch_size.labels(op).observe(items)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting and timing every HTTP request (status as sent; 500 if the app raised)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        route = m.route(scope["path"])
        counted = route != METRICS_ROUTE
        status = 500
        start = time.perf_counter()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if counted:
            m.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if counted:
                m.in_flight.dec()
            m.latency.labels(route).observe(time.perf_counter() - start)
            m.requests.labels(route, str(status)).inc()
