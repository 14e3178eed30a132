"""``klvae serve``: an HTTP encode/decode service speaking the protocol of diffusers' remote VAE client.

``create_app(Engine.from_folder(path), ServeSettings(...))`` builds the ASGI app (the protocol routes, a page for
people at ``/``, Prometheus metrics at ``/metrics``, liveness and readiness); :func:`serve` runs it with uvicorn.
Needs ``pip install 'klvae[serve]'`` (starlette, uvicorn, pillow, prometheus-client) and the PyTorch backend.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "create_app": "klvae.serve.app",
    "ServeSettings": "klvae.serve.app",
    "Engine": "klvae.serve.engine",
    "MicroBatcher": "klvae.serve.batcher",
    "serve": "klvae.serve.runner",
    "ServerThread": "klvae.serve.runner",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'klvae.serve' has no attribute {name!r}")
