"""Access and size checks: the optional bearer token and bounded body reading."""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.requests import ClientDisconnect, Request

from klvae.serve.errors import BadRequest, PayloadTooLarge, Unauthorized


def check_token(request: Request, token: str | None) -> None:
    """Require ``token`` when one is set: ``Authorization: Bearer <token>``, or HTTP Basic auth with the token as
    password (what ``requests`` sends for an endpoint URL ``http://user:<token>@host:port/decode``, so diffusers'
    client, which takes no headers, can still authenticate)."""
    if token is None:
        return
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
    elif scheme.lower() != "bearer":
        raise Unauthorized()
    if not hmac.compare_digest(value.encode("utf-8"), token.encode("utf-8")):
        raise Unauthorized("wrong token")


async def read_body(request: Request, limit: int, *, exact: int | None = None) -> bytes:
    """The request body: with ``exact``, exactly that many bytes (else 400); otherwise at most ``limit`` (else 413).

    ``Content-Length`` is checked before reading; the stream is cut off as soon as it runs over, so an oversized
    or lying request costs at most ``limit`` bytes of memory.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequest(f"Content-Length {declared[:20]!r} is not an integer") from None
        _check_length(length, limit, exact)
    cap = limit if exact is None else min(limit, exact)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                _check_length(size, limit, exact, at_least=True)
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("the client disconnected before sending the whole body") from None
    if exact is not None and size != exact:
        _check_length(size, limit, exact)
    return b"".join(chunks)


def _check_length(length: int, limit: int, exact: int | None, at_least: bool = False) -> None:
    more = "at least " if at_least else ""
    if exact is not None and length != exact:
        what = "empty body" if length == 0 else f"the body has {more}{length} bytes"
        raise BadRequest(f"{what}; the tensor's shape and dtype need exactly {exact} bytes")
    if length > limit:
        raise PayloadTooLarge(f"the body has {more}{length} bytes; the limit is {limit}")
