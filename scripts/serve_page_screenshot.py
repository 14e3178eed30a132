"""Screenshot of the page at `GET /` after one reconstruction, for docs/serve_page.png.

Starts `klvae serve` (the bundled default model) on a free port, opens the page in headless Chromium (the
tests' driver, tests/browser.py), reconstructs the bundled cat photograph at 256 px and saves the page as a
palette PNG:

    python scripts/serve_page_screenshot.py [docs/serve_page.png]
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from browser import Browser  # noqa: E402

import klvae  # noqa: E402
from klvae.serve.probe import wait_until_answering  # noqa: E402


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/serve_page.png"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "klvae.cli", "serve", "--port", str(port), "--log-level",
                               "warning"])
    try:
        wait_until_answering(f"{url}/ready", server)
        with tempfile.TemporaryDirectory() as tmp:
            photo = os.path.join(tmp, "chelsea.png")
            cat = Image.open(os.path.join(os.path.dirname(klvae.__file__), "data", "chelsea.png")).convert("RGB")
            cat.resize((256, round(256 * cat.height / cat.width)), Image.LANCZOS).save(photo)
            with Browser(window=(1000, 900)) as browser:
                page = browser.new_page(url + "/")
                page.wait_for("document.body.dataset.state === 'idle'")
                page.set_files("#file-input", [photo])
                page.wait_for("document.body.dataset.state === 'done'")
                png = page.screenshot(width=1000)
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        image.save(out, optimize=True)
        print(f"{out}: {image.width}x{image.height}, {os.path.getsize(out) // 1024} KiB")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
