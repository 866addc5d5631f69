"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.deps import ServiceDep, StackDep
from server.protocol import ChatCompletionRequest, ChatCompletionResponse
from server.routes import ERROR_RESPONSES, respond, unless_disconnected

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, stack: StackDep, service: ServiceDep, request: Request
) -> JSONResponse | StreamingResponse:
    """Chat completion with the tenant's patch stack applied."""
    return respond(await unless_disconnected(request, service.chat(body, stack)), stack)
