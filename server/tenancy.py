"""Request → tenant → patch stack: authentication and per-request stack resolution.

A request's stack is resolved once, when it is admitted, into a :class:`ResolvedStack` holding the
exact patch objects (so a later swap cannot change a request in flight), their layout and the
prefix-cache salt.

The salt is what keeps the prefix cache safe: vLLM's block hashes in mixed prompt-embeds mode cover the
token ids but not which positions are embeddings (vLLM issue #56655), so two inputs with the same ids and
a different token/embedding mask could share blocks. Every tenant + stack (by content digests) has its
own salt, and within one salt the layout is a function of the prompt alone, for prefix and suffix rows.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from patches.errors import PatchError, PatchNotFound
from patches.format import Patch
from patches.registry import PatchRegistry
from patches.stack import Layout, PatchRef, compose_stack, parse_stack
from patches.tenants import Tenant, TenantConfig, hash_api_key
from server.errors import APIError

STACK_HEADER = "X-Patch-Stack"
TENANT_HEADER = "X-Tenant-Id"
APPLIED_HEADER = "X-Patch-Applied"
_LAYOUT_CACHE_SIZE = 1024


@dataclass(frozen=True)
class ResolvedStack:
    """The patches one request runs with, fixed at admission."""

    tenant: str
    patches: tuple[Patch, ...]
    layout: Layout | None
    cache_salt: str

    @property
    def applied(self) -> str:
        """``name@version+name@version``, or ``none``: the value of ``X-Patch-Applied``."""
        return "+".join(p.ref for p in self.patches) or "none"


class TenantResolver:
    """Authenticates requests and resolves their patch stacks against the registry.

    Args:
        config: The tenant file.
        registry: Loaded patches.
        separator_id: Token id between stacked patches.
        dtype: Engine dtype; layouts are cast once and cached per stack.
    """

    def __init__(self, config: TenantConfig, registry: PatchRegistry, *, separator_id: int, dtype: torch.dtype) -> None:
        self.config = config
        self._registry = registry
        self._separator_id = separator_id
        self._dtype = dtype
        self._layouts: OrderedDict[tuple[str, ...], Layout | None] = OrderedDict()
        self._layouts_lock = threading.Lock()  # resolve() runs in request threads and the watcher's
        self.config_error: str | None = None

    def replace_config(self, config: TenantConfig) -> None:
        """Swap in a new tenant file (requests already admitted keep their stacks)."""
        self.config = config
        self.config_error = None

    def unservable(self, config: TenantConfig | None = None) -> list[str]:
        """Why each tenant of ``config`` (default: the current one) cannot be served its default stack:
        the one check behind ``/readyz`` and tenant-file reloads (the registry checks planned unloads
        against :meth:`pinned` itself, on the snapshot it is about to publish)."""
        problems = []
        for tenant in (config or self.config).tenants:
            try:
                self.resolve(tenant, None)
            except (PatchError, APIError) as exc:
                problems.append(f"tenant {tenant.id}: {exc}")
        return problems

    def pinned(self) -> list[tuple[str, list[PatchRef]]]:
        """Every tenant's default stack: what the registry must not unload."""
        return [(t.id, t.default_refs) for t in self.config.tenants]

    def authenticate(self, authorization: str | None, tenant_id: str | None) -> Tenant:
        """The tenant a request belongs to.

        With API keys configured, the bearer key decides (compared as SHA-256 digests in constant
        time); otherwise (development mode) the ``X-Tenant-Id`` header does.

        Raises:
            APIError: 401 for a missing or unknown key or tenant, 403 for a mismatched tenant header.
        """
        config = self.config
        if config.uses_keys:
            scheme, _, key = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            digest = hash_api_key(key.strip())
            match = None
            for tenant in config.tenants:
                for stored in tenant.api_keys:
                    if hmac.compare_digest(stored, digest):
                        match = tenant
            if match is None:
                raise APIError(401, "incorrect API key provided", code="invalid_api_key")
            if tenant_id is not None and tenant_id != match.id:
                raise APIError(403, f"{TENANT_HEADER} does not match the API key's tenant", param=TENANT_HEADER)
            return match
        if not tenant_id:
            raise APIError(401, f"missing {TENANT_HEADER} header (no API keys are configured)", param=TENANT_HEADER)
        tenant = config.get(tenant_id)
        if tenant is None:
            raise APIError(401, f"unknown tenant {tenant_id!r}", param=TENANT_HEADER)
        return tenant

    def resolve(self, tenant: Tenant, stack_header: str | None) -> ResolvedStack:
        """Resolve the stack for one request: the header's choice, else the tenant's default.

        Raises:
            StackError: Malformed header (400).
            APIError: 403 for a patch the tenant may not select, or ``none`` when not allowed;
                503 when the tenant's default stack is not loaded.
            PatchNotFound: A selected patch or version that is not loaded (404).
        """
        if stack_header is None:
            refs = tenant.default_refs
            try:
                patches = self._registry.resolve_all(refs)
            except PatchNotFound as exc:
                raise APIError(503, f"tenant {tenant.id!r} default patch stack is unavailable: {exc}") from exc
        else:
            refs = parse_stack(stack_header)
            if not refs and not tenant.allow_unpatched:
                raise APIError(403, f"tenant {tenant.id!r} may not disable its patches", param=STACK_HEADER)
            for ref in refs:
                if ref.name not in tenant.allowed_patches:
                    raise APIError(
                        403, f"patch {ref.name!r} is not allowed for tenant {tenant.id!r}", param=STACK_HEADER
                    )
            patches = self._registry.resolve_all(refs)
        if tenant.allowed_signers is not None:
            for patch in patches:
                if patch.meta.signer not in tenant.allowed_signers:
                    raise APIError(
                        403 if stack_header is not None else 503,
                        f"patch {patch.ref} is signed by {patch.meta.signer or 'nobody'}, "
                        f"a signer tenant {tenant.id!r} does not accept",
                        param=STACK_HEADER if stack_header is not None else None,
                    )
        digests = tuple(p.digest for p in patches)
        salt = hashlib.sha256("\0".join((tenant.id, *digests)).encode()).hexdigest()[:32]
        return ResolvedStack(
            tenant=tenant.id, patches=tuple(patches), layout=self._layout(patches, digests), cache_salt=salt
        )

    def _layout(self, patches: list[Patch], key: tuple[str, ...]) -> Layout | None:
        with self._layouts_lock:
            if key in self._layouts:
                self._layouts.move_to_end(key)
                return self._layouts[key]
        layout = compose_stack(patches, separator_id=self._separator_id)  # outside the lock: may be slow
        if layout is not None:
            layout = layout.to(self._dtype)
        with self._layouts_lock:
            if key in self._layouts:  # another thread composed it meanwhile: keep one object per stack
                self._layouts.move_to_end(key)
                return self._layouts[key]
            self._layouts[key] = layout
            if len(self._layouts) > _LAYOUT_CACHE_SIZE:
                self._layouts.popitem(last=False)
        return layout
