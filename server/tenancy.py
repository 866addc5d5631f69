"""Request → tenant → patch stack: authentication and per-request stack resolution.

A request selects its stack by ``model`` (:mod:`server.modelspec`) or ``X-Patch-Stack``, else gets the
tenant's default (:meth:`TenantResolver.select`). It is resolved once, when it is admitted, into a
:class:`ResolvedStack` holding the exact patch objects (so a later swap cannot change a request in
flight), their layout and the prefix-cache salt.

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
from dataclasses import dataclass, replace

import torch

from patches.errors import Forbidden, PatchError, PatchNotFound, StackUnavailable, Unauthenticated
from patches.format import Patch
from patches.registry import PatchRegistry
from patches.stack import Layout, PatchRef, compose_stack, parse_stack
from patches.tenants import Tenant, TenantConfig, hash_api_key
from server.modelspec import MODEL_PARAM, ModelSpecError, model_name, parse_model

STACK_HEADER = "X-Patch-Stack"
TENANT_HEADER = "X-Tenant-Id"
APPLIED_HEADER = "X-Patch-Applied"
_LAYOUT_CACHE_SIZE = 1024
_MISSING = object()  # no cached layout (None is a valid one: the empty stack)


class NotComposed(Exception):
    """The selected stack's layout has not been composed yet (from :meth:`TenantResolver.select` with
    ``compose=False``). ``stack`` is the request's stack, admitted (parsed, checked, salted) but without its
    layout: pass it to :meth:`TenantResolver.compose` where blocking is fine (composing casts and joins
    tensors), so the request is not parsed and admitted a second time."""

    def __init__(self, message: str, stack: ResolvedStack) -> None:
        super().__init__(message)
        self.stack = stack


@dataclass(frozen=True)
class Caller:
    """An authenticated request, before its stack is fixed (that needs the body's ``model``)."""

    tenant: Tenant
    stack_header: str | None


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
            except PatchError as exc:
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
            Unauthenticated: A missing or unknown key or tenant (401).
            Forbidden: A tenant header that contradicts the key (403).
        """
        config = self.config
        if config.uses_keys:
            scheme, _, key = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            digest = hash_api_key(key.strip())
            match = None
            for tenant in config.tenants:
                for stored in tenant.api_keys:
                    if hmac.compare_digest(stored, digest):
                        match = tenant
            if match is None:
                raise Unauthenticated("incorrect API key provided", code="invalid_api_key")
            if tenant_id is not None and tenant_id != match.id:
                raise Forbidden(f"{TENANT_HEADER} does not match the API key's tenant", param=TENANT_HEADER)
            return match
        if not tenant_id:
            raise Unauthenticated(f"missing {TENANT_HEADER} header (no API keys are configured)", param=TENANT_HEADER)
        tenant = config.get(tenant_id)
        if tenant is None:
            raise Unauthenticated(f"unknown tenant {tenant_id!r}", param=TENANT_HEADER)
        return tenant

    def select(
        self, tenant: Tenant, stack_header: str | None, model: str | None, base: str, *, compose: bool = True
    ) -> ResolvedStack:
        """Resolve one request's stack from its ``model`` and ``X-Patch-Stack``: a stack named in ``model``
        wins; the header may repeat it (the same refs) but not contradict it; without either, the
        tenant's default. With ``compose`` False it never blocks: a stack whose layout is not cached
        raises :class:`NotComposed` instead of composing it.

        Raises:
            UnknownModel: A ``model`` that is not served (404).
            ModelSpecError: A malformed stack in ``model``, or one the header contradicts (400).
            StackError: A malformed header (400); and everything :meth:`resolve_refs` raises.
        """
        from_model = parse_model(model, base)
        from_header = parse_stack(stack_header) if stack_header is not None else None
        if from_model is None:
            return self.resolve_refs(tenant, from_header, param=STACK_HEADER, compose=compose)
        if from_header is not None and from_header != from_model:
            raise ModelSpecError(
                f"model {model!r} and {STACK_HEADER}: {stack_header.strip()!r} select different stacks; "
                "send one of them (or the same stack in both)"
            )
        return self.resolve_refs(tenant, from_model, param=MODEL_PARAM, compose=compose)

    def resolve(self, tenant: Tenant, stack_header: str | None) -> ResolvedStack:
        """Resolve the stack for one request: the header's choice, else the tenant's default.

        Raises:
            StackError: Malformed header (400), and everything :meth:`resolve_refs` raises.
        """
        return self.resolve_refs(tenant, parse_stack(stack_header) if stack_header is not None else None)

    def resolve_refs(
        self, tenant: Tenant, refs: list[PatchRef] | None, *, param: str = STACK_HEADER, compose: bool = True
    ) -> ResolvedStack:
        """Resolve a selected stack (``refs``; None for the tenant's default) into patches, layout and salt
        (``compose`` False: :class:`NotComposed` rather than composing a layout that is not cached).

        Raises:
            Forbidden: A patch the tenant may not select, or ``none`` when not allowed (403, naming ``param``).
            StackUnavailable: The tenant's default stack is not loaded (503).
            PatchNotFound: A selected patch or version that is not loaded (404).
        """
        patches = self.admissible(tenant, refs, param=param)
        digests = tuple(p.digest for p in patches)
        salt = hashlib.sha256("\0".join((tenant.id, *digests)).encode()).hexdigest()[:32]
        stack = ResolvedStack(tenant=tenant.id, patches=tuple(patches), layout=None, cache_salt=salt)
        layout = self._cached_layout(digests)
        if layout is _MISSING:
            if not compose:
                raise NotComposed(f"the layout of stack {stack.applied} is not composed", stack)
            return self.compose(stack)
        return replace(stack, layout=layout)

    def compose(self, stack: ResolvedStack) -> ResolvedStack:
        """``stack`` with its layout, composed (and cached) if no other request composed it first; blocks."""
        return replace(stack, layout=self._layout(list(stack.patches), tuple(p.digest for p in stack.patches)))

    def admissible(self, tenant: Tenant, refs: list[PatchRef] | None, *, param: str = STACK_HEADER) -> list[Patch]:
        """The patches ``refs`` (None: the default stack) resolve to for ``tenant``, if it may use them.

        Raises:
            Forbidden, StackUnavailable, PatchNotFound: As :meth:`resolve_refs`.
        """
        if refs is None:
            try:
                patches = self._registry.resolve_all(tenant.default_refs)
            except PatchNotFound as exc:
                raise StackUnavailable(f"tenant {tenant.id!r} default patch stack is unavailable: {exc}") from exc
        else:
            if not refs and not tenant.allow_unpatched:
                raise Forbidden(f"tenant {tenant.id!r} may not disable its patches", param=param)
            for ref in refs:
                if ref.name not in tenant.allowed_patches:
                    raise Forbidden(f"patch {ref.name!r} is not allowed for tenant {tenant.id!r}", param=param)
            patches = self._registry.resolve_all(refs)
        if tenant.allowed_signers is not None:
            for patch in patches:
                if patch.meta.signer not in tenant.allowed_signers:
                    message = (
                        f"patch {patch.ref} is signed by {patch.meta.signer or 'nobody'}, "
                        f"a signer tenant {tenant.id!r} does not accept"
                    )
                    raise Forbidden(message, param=param) if refs is not None else StackUnavailable(message)
        return patches

    def models(self, tenant: Tenant, base: str) -> list[tuple[str, list[Patch] | None]]:
        """What ``model`` may name for ``tenant`` now, with the patches each runs with: ``base`` (the
        default stack; None if it is unavailable), the default stack spelled out, ``base:none`` if allowed,
        then each allowed patch that is loaded, as ``base:name`` (newest) and ``base:name@version``. Any
        ordered ``+`` combination of the listed patches may be sent as well."""
        try:
            default: list[Patch] | None = self.admissible(tenant, None)
        except PatchError:
            default = None
        out: dict[str, list[Patch] | None] = {base: default}
        candidates = [tenant.default_refs] if tenant.default_refs else []
        candidates += [[]] if tenant.allow_unpatched else []
        loaded: dict[str, list[int]] = {}
        for entry in self._registry.entries():
            loaded.setdefault(entry.patch.name, []).append(entry.patch.version)
        for name in tenant.allowed_patches:
            versions = loaded.get(name, [])
            candidates += [[PatchRef(name)]] if versions else []
            candidates += [[PatchRef(name, v)] for v in versions]
        for refs in candidates:
            try:
                patches = self.admissible(tenant, refs)
            except PatchError:
                continue  # not servable to this tenant right now (e.g. a signer it does not accept)
            out.setdefault(model_name(base, refs), patches)
        return list(out.items())

    def _cached_layout(self, key: tuple[str, ...]) -> Layout | None | object:
        """The cached layout of the stack of digests ``key`` (``None`` for no patches), else ``_MISSING``."""
        with self._layouts_lock:
            if key in self._layouts:
                self._layouts.move_to_end(key)
                return self._layouts[key]
        return _MISSING

    def _layout(self, patches: list[Patch], key: tuple[str, ...]) -> Layout | None:
        cached = self._cached_layout(key)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
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
