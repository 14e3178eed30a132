"""Readiness: the server takes work once the model is loaded and has run once (the warm-up).

``GET /health`` is liveness (the process answers); ``GET /ready`` is readiness, 200 when ready and 503 while
starting, after a failed warm-up, or while shutting down, which is what Kubernetes' readinessProbe and load
balancers' health checks act on: they send traffic only to ready replicas.
"""

from __future__ import annotations

import time
from typing import Literal

import torch

from klvae.serve.engine import Engine

State = Literal["starting", "ready", "failed", "stopping"]
# Warm-up image side, in latent pixels: small, but past the sizes where kernels take special paths.
WARMUP_LATENT_SIDE = 8


class Readiness:
    """The server's readiness state, with a human-readable detail (the warm-up error, its duration)."""

    def __init__(self) -> None:
        self.state: State = "starting"
        self.detail = "warming up the model"
        self.warmup_s: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def set(self, state: State, detail: str) -> None:
        self.state, self.detail = state, detail

    def to_json(self) -> dict[str, object]:
        return {"status": self.state, "detail": self.detail, "warmup_s": self.warmup_s}


def warm_up(engine: Engine) -> float:
    """Encode a small blank image and decode its latents once (first-call costs: allocations, kernel choice,
    lazy initialisation); returns the seconds it took. Blocking: run it on the model thread."""
    side = WARMUP_LATENT_SIDE * engine.factor
    start = time.perf_counter()
    z = engine.run("encode", torch.zeros(1, engine.config.in_channels, side, side))
    engine.run("decode", z)
    return time.perf_counter() - start
