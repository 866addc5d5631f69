"""Request-body size limits, enforced while the body streams in (chunked or not).

:class:`BodyLimitMiddleware` bounds every HTTP request body before routing, JSON parsing or
authentication: a ``Content-Length`` above the limit is refused at once, and a body without one
(``Transfer-Encoding: chunked``) is refused as soon as the bytes received pass the limit; the rest
is never read. Routes that take larger bodies (the admin patch upload) are left out of it and read
theirs with :func:`read_body` under their own limit.
"""

from __future__ import annotations

from collections.abc import Collection

from fastapi import Request
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response

# Paths that bound their own body with read_body() (``POST /admin/patches``: PATCHSERVE_MAX_UPLOAD_BYTES).
SELF_LIMITED_PATHS: frozenset[str] = frozenset({"/admin/patches"})


def too_large(limit: int, what: str = "request body") -> str:
    return f"{what} larger than {limit} bytes"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes its limit. An ``HTTPException`` because FastAPI
    re-raises those from body parsing (anything else becomes a 400); it renders as a 413 in the
    OpenAI error shape through the app's handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit))


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length`` of raw ASGI headers; ``None`` if absent or malformed (then only the
    bytes actually received count)."""
    for key, value in headers:
        if key.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


class BodyLimitMiddleware:
    """Pure ASGI middleware refusing request bodies over ``max_bytes`` with 413, without reading them.

    Args:
        app: The wrapped application.
        max_bytes: Largest body accepted (``PATCHSERVE_MAX_REQUEST_BYTES``).
        exempt: Paths passed through untouched because they enforce their own limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Collection[str] = SELF_LIMITED_PATHS) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope.get("headers", []))
        if declared is not None and declared > self.max_bytes:
            await error_response(413, too_large(self.max_bytes))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


async def read_body(request: Request, limit: int, what: str = "request body") -> bytes:
    """The request body, read chunk by chunk: 413 as soon as it passes ``limit`` bytes (or at once
    when its ``Content-Length`` says it will), so an oversized body is never buffered whole."""
    declared = declared_length(request.scope.get("headers", []))
    if declared is not None and declared > limit:
        raise APIError(413, too_large(limit, what))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, too_large(limit, what))
    return bytes(body)
