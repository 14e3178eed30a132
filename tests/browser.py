"""A small headless-Chromium driver for the page tests: the Chrome DevTools Protocol over a pipe.

Chromium started with ``--remote-debugging-pipe`` reads protocol messages (JSON, each ending in a NUL byte)
on file descriptor 3 and writes its answers and events on descriptor 4: no port, no websocket library, no
downloaded browser. Uses Debian's ``chromium`` (``$KLVAE_CHROMIUM`` overrides the binary).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

# What headless Chromium needs as root in a container with no network beyond loopback.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars"]


def chromium_binary() -> str | None:
    """The Chromium to drive: ``$KLVAE_CHROMIUM``, else ``chromium`` (Debian) or ``chromium-browser`` on PATH."""
    env = os.environ.get("KLVAE_CHROMIUM")
    if env:
        return env if os.path.isfile(env) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Browser:
    """``with Browser() as b: page = b.new_page(url)``; one Chromium process, one profile in a temp folder."""

    def __init__(self, binary: str | None = None, window: tuple[int, int] = (1100, 900), timeout_s: float = 60):
        binary = binary or chromium_binary()
        if binary is None:
            raise BrowserError("no chromium binary found (install Debian's chromium, or set $KLVAE_CHROMIUM)")
        self.timeout_s = timeout_s
        self._profile = tempfile.mkdtemp(prefix="klvae-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        browser = [binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
                   f"--window-size={window[0]},{window[1]}", "about:blank"]
        # bash puts the protocol pipes on descriptors 3 and 4 (no preexec_fn: no Python code runs between
        # fork and exec, which is unsafe in a threaded process such as one that imported JAX).
        r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w))  # not 3 or 4
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        cmd = ["bash", "-c", f'exec "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-', "bash", *browser]  # dash: fds 0-9 only
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, pass_fds=(r, w))
        os.close(r)
        os.close(w)
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()

    # ------------------------------------------------------------------------------------------ protocol
    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._answers[message["id"]] = message
                        self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """One protocol command; returns its result (raises on a protocol error or timeout)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while self._next_id not in self._answers:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "chromium exited" if self._closed else "timed out"
                    raise BrowserError(f"{method}: {why}; stderr: {b''.join(self._stderr)[-2000:]!r}")
                self._cond.wait(left)
            answer = self._answers.pop(self._next_id)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def new_page(self, url: str) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.goto(url)
        return page

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close")
                except BrowserError:
                    pass
                self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab: navigate, evaluate JavaScript, set a file input, wait for a condition, take a screenshot."""

    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session)

    def goto(self, url: str) -> None:
        self.send("Page.enable")
        answer = self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"navigating to {url}: {answer['errorText']}")
        self.wait_for("document.readyState === 'complete'")

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        answer = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60.0, poll_s: float = 0.05) -> Any:
        """Poll until the expression is truthy; returns its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout_s} s waiting for: {expression}")
            time.sleep(poll_s)

    def set_files(self, selector: str, paths: list[str]) -> None:
        """Choose files in an ``<input type=file>`` as a person would (fires its change event)."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise BrowserError(f"no element matches {selector!r}")
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": [os.path.abspath(p) for p in paths]})

    def screenshot(self, width: int | None = None, height: int | None = None) -> bytes:
        """A PNG of the page (``width`` x ``height`` CSS pixels, default: the whole page)."""
        if width is None or height is None:
            size = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            width, height = width or size[0], height or size[1]
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        return base64.b64decode(data)
