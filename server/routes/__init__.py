"""HTTP routers. Each module exports ``router``; :func:`respond` turns a service result into a response."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from server.protocol import ErrorResponse
from server.tenancy import APPLIED_HEADER, ResolvedStack

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 500, 503)
}


def respond(result: BaseModel | AsyncIterator[str], stack: ResolvedStack) -> JSONResponse | StreamingResponse:
    """JSON for a response model, SSE for a stream; both name the applied patches in a header."""
    headers = {APPLIED_HEADER: stack.applied}
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"), headers=headers)
    headers["Cache-Control"] = "no-cache"
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)
