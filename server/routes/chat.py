"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.deps import CallerDep, ServiceDep, label_stack
from server.protocol import ChatCompletionRequest
from server.responses import ChatCompletionResponse
from server.routes import ERROR_RESPONSES, respond, unless_disconnected

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, caller: CallerDep, service: ServiceDep, request: Request
) -> JSONResponse | StreamingResponse:
    """Chat completion with the patch stack ``model`` (or ``X-Patch-Stack``, or the tenant) selects."""
    stack = await service.admit(caller, body.model)
    label_stack(request, caller, stack)
    return respond(await unless_disconnected(request, service.chat(body, stack)), stack)
