"""Running the app with uvicorn: in the foreground (the CLI), or in a background thread (tests, benchmarks).

uvicorn gives the graceful shutdown: on SIGINT/SIGTERM (or ``should_exit``) it stops accepting connections,
lets requests in flight finish (up to ``graceful_timeout_s``), then the app's lifespan stops the batcher.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

import uvicorn

# uvicorn settings shared by both ways of running.
_DEFAULTS: dict[str, Any] = dict(lifespan="on", server_header=False, timeout_keep_alive=5, limit_concurrency=256,
                                 timeout_graceful_shutdown=30)


class _Stopped(Exception):
    """Raised by our signal handler once uvicorn has shut down and re-raises the signal it caught."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          **uvicorn_options: Any) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; blocks. Returns normally after a graceful shutdown (call from the main
    thread: uvicorn handles the first signal, then re-raises it, which lands in our handler)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **(_DEFAULTS | uvicorn_options))
    server = uvicorn.Server(config)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopped = False
    try:
        server.run()
    except _Stopped:
        stopped = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started and not stopped:
        raise OSError(f"the server could not start on {host}:{port} (see the log above)")


class ServerThread:
    """uvicorn serving ``app`` on a loopback port in a daemon thread: ``with ServerThread(app) as s: s.url``.

    ``port=0`` picks a free port (the socket is bound here, so there is no race for it).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 **uvicorn_options: Any):
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, **(_DEFAULTS | uvicorn_options))
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="klvae-serve", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(timeout_s=1)
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful: requests in flight finish first."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
