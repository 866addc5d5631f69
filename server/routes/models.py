"""``GET /v1/models``: per authenticated tenant, the base model and the stacks it may select."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.deps import CallerDep, ResolverDep
from server.responses import ModelCard, ModelList
from server.routes import ERROR_RESPONSES

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request, caller: CallerDep, resolver: ResolverDep) -> ModelList:
    """The base model (``id`` = the served name: the tenant's default stack), then every ``model`` value
    that selects a stack this tenant may use (``parent`` = the base; ``patches`` = the exact versions
    it runs with now)."""
    base: str = request.app.state.model_name
    cards = []
    for model, patches in resolver.models(caller.tenant, base):
        refs = [p.ref for p in patches] if patches is not None else None
        parent = None if model == base else base
        cards.append(ModelCard(id=model, root=base, parent=parent, patches=refs))
    return ModelList(data=cards)
