"""``GET /v1/models``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.protocol import ModelCard, ModelList
from server.routes import ERROR_RESPONSES

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    """The served base model."""
    name: str = request.app.state.model_name
    return ModelList(data=[ModelCard(id=name, root=str(name))])
