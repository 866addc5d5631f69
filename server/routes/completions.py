"""``POST /v1/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.deps import ServiceDep, StackDep
from server.protocol import CompletionRequest, CompletionResponse
from server.routes import ERROR_RESPONSES, respond, unless_disconnected

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(
    body: CompletionRequest, stack: StackDep, service: ServiceDep, request: Request
) -> JSONResponse | StreamingResponse:
    """Text completion with the tenant's patch stack applied."""
    return respond(await unless_disconnected(request, service.complete(body, stack)), stack)
