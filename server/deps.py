"""FastAPI dependencies: state accessors and the per-request tenant/stack resolution."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from server.errors import APIError
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


def get_stack(
    resolver: Annotated[TenantResolver, Depends(get_resolver)],
    authorization: Annotated[str | None, Header()] = None,
    x_tenant_id: Annotated[str | None, Header()] = None,
    x_patch_stack: Annotated[str | None, Header()] = None,
) -> ResolvedStack:
    """Authenticate the caller and fix the request's patch stack, once, at admission."""
    tenant = resolver.authenticate(authorization, x_tenant_id)
    return resolver.resolve(tenant, x_patch_stack)


SettingsDep = Annotated[Settings, Depends(get_settings)]
ResolverDep = Annotated[TenantResolver, Depends(get_resolver)]
ServiceDep = Annotated[CompletionService, Depends(get_service)]
StackDep = Annotated[ResolvedStack, Depends(get_stack)]
