"""``/admin``: the operator API, guarded by its own bearer token (never a tenant key)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from server.admin import AdminListing, AdminPatch
from server.deps import AdminDep, SettingsDep, require_admin
from server.errors import APIError
from server.limits import read_body
from server.routes import ERROR_RESPONSES

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=ERROR_RESPONSES)


class RollbackRequest(BaseModel):
    version: int = Field(ge=1)


class RollbackResult(BaseModel):
    name: str
    version: int
    withdrawn: list[str]


class ReloadResult(BaseModel):
    applied: bool
    error: str | None = None


@router.get("/patches", response_model=AdminListing)
async def list_patches(admin: AdminDep) -> AdminListing:
    """Loaded patches (version, sha256, signer, loaded-at, tenants using each) and refused files."""
    return admin.listing()


@router.post("/patches", response_model=AdminPatch, status_code=201)
async def upload_patch(request: Request, admin: AdminDep, settings: SettingsDep) -> AdminPatch:
    """Upload a patch file (raw bytes): verified, written to the patch directory, then live.

    The body is read as it streams in and refused (413) once it passes ``max_upload_bytes``."""
    data = await read_body(request, settings.max_upload_bytes, "patch upload")
    if not data:
        raise APIError(400, "empty upload: send the patch file as the request body")
    return await asyncio.to_thread(admin.upload, data)  # verification and file I/O off the event loop


@router.delete("/patches/{name}/{version}", status_code=204)
async def unload_patch(name: str, version: int, admin: AdminDep) -> None:
    """Unload a patch version and delete its file; refused while a tenant's default stack needs it."""
    await asyncio.to_thread(admin.unload, name, version)


@router.post("/patches/{name}/rollback", response_model=RollbackResult)
async def roll_back_patch(name: str, body: RollbackRequest, admin: AdminDep) -> RollbackResult:
    """Explicitly roll ``name`` back to ``version`` (logged); newer versions are unloaded and withdrawn."""
    withdrawn = await asyncio.to_thread(admin.roll_back, name, body.version)
    return RollbackResult(name=name, version=body.version, withdrawn=withdrawn)


@router.post("/tenants/reload", response_model=ReloadResult)
async def reload_tenants(admin: AdminDep) -> ReloadResult:
    """Re-read the tenant file now (it is also watched)."""
    error = await asyncio.to_thread(admin.reload_tenants)
    return ReloadResult(applied=error is None, error=error)
