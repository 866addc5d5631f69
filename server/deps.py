"""FastAPI dependencies: state accessors and the per-request tenant/stack resolution."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from patches.tenants import Tenant
from server.admin import AdminService
from server.errors import APIError
from server.metrics import UNRESOLVED
from server.serving import CompletionService
from server.settings import Settings
from server.tenancy import ResolvedStack, TenantResolver


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_resolver(request: Request) -> TenantResolver:
    resolver: TenantResolver | None = request.app.state.resolver
    if resolver is None:
        raise APIError(503, "the server is starting: patches and tenants are not loaded yet")
    return resolver


def get_service(request: Request) -> CompletionService:
    service: CompletionService | None = request.app.state.service
    if service is None:
        raise APIError(503, "the server is starting: the inference engine is not ready yet")
    return service


@dataclass(frozen=True)
class Caller:
    """An authenticated request, before its stack is fixed (that needs the body's ``model``)."""

    tenant: Tenant
    resolver: TenantResolver
    stack_header: str | None


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
    return Caller(tenant, resolver, x_patch_stack)


async def admit(request: Request, caller: Caller, model: str | None) -> ResolvedStack:
    """Fix the request's patch stack, once, at admission, from ``model`` and ``X-Patch-Stack``
    (:meth:`TenantResolver.select`). In a worker thread: a stack's first use composes its layout."""
    base: str = request.app.state.model_name
    stack = await asyncio.to_thread(caller.resolver.select, caller.tenant, caller.stack_header, model, base)
    request.state.metric_labels = (caller.tenant.id, request.app.state.metrics.stack_label(stack.applied))
    return stack


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Guard of ``/admin``: the admin bearer token, compared as SHA-256 digests in constant time."""
    token = get_settings(request).admin_token
    if token is None:
        raise APIError(404, "the admin API is disabled (no PATCHSERVE_ADMIN_TOKEN)")
    scheme, _, presented = (authorization or "").partition(" ")
    expected = hashlib.sha256(token.get_secret_value().encode()).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), expected):
        raise APIError(401, "admin API: missing or wrong admin token", code="invalid_admin_token")


def get_admin(request: Request) -> AdminService:
    admin: AdminService | None = request.app.state.admin
    if admin is None:
        raise APIError(503, "the server is starting: patches and tenants are not loaded yet")
    return admin


SettingsDep = Annotated[Settings, Depends(get_settings)]
AdminDep = Annotated[AdminService, Depends(get_admin)]
ResolverDep = Annotated[TenantResolver, Depends(get_resolver)]
ServiceDep = Annotated[CompletionService, Depends(get_service)]
CallerDep = Annotated[Caller, Depends(get_caller)]
