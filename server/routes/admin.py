"""``/admin``: the operator API, guarded by its own bearer token (never a tenant key)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from server.admin import AdminListing, AdminPatch
from server.deps import AdminDep, require_admin
from server.errors import APIError
from server.routes import ERROR_RESPONSES

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=ERROR_RESPONSES)
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


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
async def upload_patch(request: Request, admin: AdminDep) -> AdminPatch:
    """Upload a patch file (raw bytes): verified, written to the patch directory, then live."""
    if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES:
        raise APIError(413, f"patch upload larger than {MAX_UPLOAD_BYTES} bytes")
    data = await request.body()
    if not data:
        raise APIError(400, "empty upload: send the patch file as the request body")
    return admin.upload(data)


@router.delete("/patches/{name}/{version}", status_code=204)
async def unload_patch(name: str, version: int, admin: AdminDep) -> None:
    """Unload a patch version and delete its file; refused while a tenant's default stack needs it."""
    admin.unload(name, version)


@router.post("/patches/{name}/rollback", response_model=RollbackResult)
async def roll_back_patch(name: str, body: RollbackRequest, admin: AdminDep) -> RollbackResult:
    """Explicitly roll ``name`` back to ``version`` (logged); newer versions are unloaded and withdrawn."""
    return RollbackResult(name=name, version=body.version, withdrawn=admin.roll_back(name, body.version))


@router.post("/tenants/reload", response_model=ReloadResult)
async def reload_tenants(admin: AdminDep) -> ReloadResult:
    """Re-read the tenant file now (it is also watched)."""
    error = admin.reload_tenants()
    return ReloadResult(applied=error is None, error=error)
