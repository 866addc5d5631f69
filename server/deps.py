"""FastAPI dependencies: state accessors and the per-request tenant/stack resolution."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from server.admin import AdminService
from server.errors import APIError
from server.metrics import UNRESOLVED
from server.serving import CompletionService
from server.settings import Settings
from server.tenancy import Caller, ResolvedStack, TenantResolver


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


# The per-request dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in a worker
# thread, a round trip that costs more than these lookups themselves.
async def get_resolver(request: Request) -> TenantResolver:
    resolver: TenantResolver | None = request.app.state.resolver
    if resolver is None:
        raise APIError(503, "the server is starting: patches and tenants are not loaded yet")
    return resolver


async def get_service(request: Request) -> CompletionService:
    service: CompletionService | None = request.app.state.service
    if service is None:
        raise APIError(503, "the server is starting: the inference engine is not ready yet")
    return service


async def get_caller(
    request: Request,
    resolver: Annotated[TenantResolver, Depends(get_resolver)],
    authorization: Annotated[str | None, Header()] = None,
    x_tenant_id: Annotated[str | None, Header()] = None,
    x_patch_stack: Annotated[str | None, Header()] = None,
) -> Caller:
    """Authenticate the caller (cheap: one SHA-256 per key). The metric labels (tenant, stack) are left
    on the request state for the status counter."""
    tenant = resolver.authenticate(authorization, x_tenant_id)
    request.state.metric_labels = (tenant.id, UNRESOLVED)
    return Caller(tenant, x_patch_stack)


def label_stack(request: Request, caller: Caller, stack: ResolvedStack) -> None:
    """Name the admitted stack in the request's metric labels (the status counter reads them)."""
    request.state.metric_labels = (caller.tenant.id, request.app.state.metrics.stack_label(stack.applied))


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Guard of ``/admin``: the admin bearer token, compared as SHA-256 digests in constant time."""
    token = get_settings(request).admin_token
    if token is None:
        raise APIError(404, "the admin API is disabled (no PATCHSERVE_ADMIN_TOKEN)")
    scheme, _, presented = (authorization or "").partition(" ")
    expected = hashlib.sha256(token.get_secret_value().encode()).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), expected):
        raise APIError(401, "admin API: missing or wrong admin token", code="invalid_admin_token")


async def get_admin(request: Request) -> AdminService:
    admin: AdminService | None = request.app.state.admin
    if admin is None:
        raise APIError(503, "the server is starting: patches and tenants are not loaded yet")
    return admin


SettingsDep = Annotated[Settings, Depends(get_settings)]
AdminDep = Annotated[AdminService, Depends(get_admin)]
ResolverDep = Annotated[TenantResolver, Depends(get_resolver)]
ServiceDep = Annotated[CompletionService, Depends(get_service)]
CallerDep = Annotated[Caller, Depends(get_caller)]
