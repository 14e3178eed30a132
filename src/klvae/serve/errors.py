"""Errors of the HTTP service. Request errors carry their HTTP status and become a JSON body:
``{"error": message, "code": short name, "status": HTTP status}``."""

from __future__ import annotations

from klvae.errors import KLVAEError


class ServeError(KLVAEError):
    """The server cannot start as configured (missing model folder, bad option)."""


class RequestError(KLVAEError):
    """A request the server refuses; ``status`` is the HTTP status sent back, ``code`` a stable short name."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        self.reason = reason or self.code  # finer than ``code`` where useful; a metrics label, not sent

    def to_json(self) -> dict[str, object]:
        return {"error": self.message, "code": self.code, "status": self.status}


class BadRequest(RequestError):
    """Malformed parameters, tensor bytes or image (400)."""


class Unauthorized(RequestError):
    """Missing or wrong bearer token (401)."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "a valid token is required: send 'Authorization: Bearer <token>'"):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="klvae"'})


class PayloadTooLarge(RequestError):
    """The request exceeds a size limit (body bytes, pixels) (413)."""

    status = 413
    code = "too_large"


class Unavailable(RequestError):
    """The server is overloaded or shutting down; retry later (503)."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 1, *, reason: str | None = None):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, reason=reason)


class InternalError(RequestError):
    """The model failed on a valid request (500); the server keeps serving."""

    status = 500
    code = "internal"
