"""``GET /healthz`` (process alive) and ``GET /readyz`` (engine loaded and patches ready)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def get_health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def get_readiness(request: Request) -> JSONResponse:
    """Readiness: the engine is up, every tenant's default stack resolves, the shared version ledger
    reads, and no background task keeps failing."""
    state = request.app.state
    problems: list[str] = []
    if state.startup_error:
        problems.append(state.startup_error)
    elif state.service is None:
        problems.append("engine starting")
    if state.resolver is None:
        problems.append("patches and tenants not loaded")
    else:
        problems += state.resolver.unservable()
        if state.registry.ledger.error:
            problems.append(state.registry.ledger.error)
    if state.supervisor is not None:
        problems += state.supervisor.problems()
    status = 200 if not problems else 503
    return JSONResponse({"status": "ready" if not problems else "not ready", "problems": problems}, status_code=status)
