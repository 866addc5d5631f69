"""``POST /v1/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.deps import CallerDep, ServiceDep, label_stack
from server.protocol import CompletionRequest
from server.responses import CompletionResponse
from server.routes import ERROR_RESPONSES, respond, unless_disconnected

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(
    body: CompletionRequest, caller: CallerDep, service: ServiceDep, request: Request
) -> JSONResponse | StreamingResponse:
    """Text completion with the patch stack ``model`` (or ``X-Patch-Stack``, or the tenant) selects."""
    stack = await service.admit(caller, body.model)
    label_stack(request, caller, stack)
    return respond(await unless_disconnected(request, service.complete(body, stack)), stack)
