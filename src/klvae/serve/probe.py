"""Waiting for a `klvae serve` started elsewhere (a subprocess) to answer: for tests, benchmarks and scripts."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request


def wait_until_answering(url: str, proc: subprocess.Popen | None = None, seconds: float = 120.0) -> None:
    """Poll ``url`` (``/health`` or ``/ready``) until it answers 200. Raises RuntimeError, with the server's
    stderr when it was captured, if ``proc`` exits first or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if proc is not None and proc.poll() is not None:
            err = proc.communicate()[1] if proc.stderr is not None else ""
            raise RuntimeError(f"the server exited before {url} answered: {err}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {seconds:g} s")
        time.sleep(0.2)
