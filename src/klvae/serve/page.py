"""``GET /``: the page for people (``static/index.html``: one self-contained file, no CDN, works offline).

The page itself holds nothing secret, so it is served without the token; it asks for the token when the API
answers 401 and sends it with its own requests.
"""

from __future__ import annotations

import functools
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

# The page loads nothing from elsewhere: scripts and styles are inline, images are data: or blob: URLs.
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def page_html() -> str:
    return resources.files("klvae.serve").joinpath("static/index.html").read_text(encoding="utf-8")


async def index(request: Request) -> Response:
    return HTMLResponse(page_html(), headers=HEADERS)
