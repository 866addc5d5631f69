"""``GET /metrics``: patchserve's metrics, then the engine's (vLLM's ``vllm:*``) and the process's."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def get_metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    state = request.app.state
    engine_registry = getattr(state.engine, "metrics_registry", None) or REGISTRY
    return Response(state.metrics.render(engine_registry), media_type=CONTENT_TYPE_LATEST)
