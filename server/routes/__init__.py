"""HTTP routers. Each module exports ``router``; :func:`respond` turns a service result into a response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from server.errors import APIError
from server.responses import ErrorResponse
from server.tenancy import APPLIED_HEADER, ResolvedStack

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 500, 503)
}


def respond(result: BaseModel | AsyncIterator[str], stack: ResolvedStack) -> JSONResponse | StreamingResponse:
    """JSON for a response model, SSE for a stream; both name the applied patches in a header."""
    headers = {APPLIED_HEADER: stack.applied}
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"), headers=headers)
    headers["Cache-Control"] = "no-cache"
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)


T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first (so the engine aborts the request).

    Streams need no help: closing the response closes the generator. This covers non-streaming
    requests, whose handler would otherwise generate to the end for nobody.
    """
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
    if not task.done():
        task.cancel()
        raise APIError(499, "client closed the request")
    return task.result()
