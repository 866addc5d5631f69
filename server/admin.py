"""The admin service behind ``/admin``: list, upload, unload and roll back patches; reload tenants."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from patches.errors import PatchNotFound
from patches.format import Patch, write_atomic
from patches.registry import LoadedPatch, PatchRegistry
from server.tenancy import TenantResolver
from server.watcher import PatchWatcher

log = logging.getLogger(__name__)


class AdminPatch(BaseModel):
    name: str
    version: int
    sha256: str
    signer: str | None
    n_tokens: int
    source: str
    loaded_at: str
    tenants: list[str]


class AdminRejection(BaseModel):
    source: str
    reason: str
    message: str
    at: str


class AdminListing(BaseModel):
    patches: list[AdminPatch]
    rejections: list[AdminRejection]
    tenant_config_error: str | None = None
    version_floors: dict[str, int]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AdminService:
    """Operator actions on the registry; every change is logged.

    Args:
        registry: Loaded patches.
        resolver: Tenant configuration (to show which tenants use a patch).
        watcher: Applies tenant-file reloads.
        patch_dir: Where uploads are written, so they survive restarts and reach other replicas.
    """

    def __init__(self, registry: PatchRegistry, resolver: TenantResolver, watcher: PatchWatcher, patch_dir: Path):
        self.registry = registry
        self.resolver = resolver
        self.watcher = watcher
        self.patch_dir = patch_dir

    def _users(self, entry: LoadedPatch) -> list[str]:
        users = []
        for tenant, refs in self.resolver.pinned():
            try:
                stack = self.registry.resolve_all(refs)
            except PatchNotFound:
                continue
            if any(p.digest == entry.patch.digest for p in stack):
                users.append(tenant)
        return users

    def _info(self, entry: LoadedPatch) -> AdminPatch:
        patch = entry.patch
        return AdminPatch(
            name=patch.name,
            version=patch.version,
            sha256=patch.digest,
            signer=patch.meta.signer,
            n_tokens=patch.n_tokens,
            source=entry.source,
            loaded_at=_iso(entry.loaded_at),
            tenants=self._users(entry),
        )

    def listing(self) -> AdminListing:
        entries = self.registry.entries()
        return AdminListing(
            patches=[self._info(e) for e in entries],
            rejections=[
                AdminRejection(source=r.source, reason=r.reason, message=r.message, at=_iso(r.at))
                for r in self.registry.rejections()
            ],
            tenant_config_error=self.resolver.config_error,
            version_floors={name: self.registry.guard.floor(name) for name in sorted(self.registry.names())},
        )

    def upload(self, data: bytes) -> AdminPatch:
        """Verify an uploaded patch file, write it to the patch directory and publish it."""

        def persist(patch: Patch) -> str:
            return write_atomic(self.patch_dir / f"{patch.name}-v{patch.version}.safetensors", data).name

        patch = self.registry.load_bytes(data, persist)
        log.info("ADMIN upload: %s (%s)", patch.ref, patch.digest)
        return next(self._info(e) for e in self.registry.entries() if e.patch.digest == patch.digest)

    def unload(self, name: str, version: int) -> None:
        """Unload a version and delete its file (so neither a restart nor the watcher brings it back)."""
        entry = next((e for e in self.registry.entries() if (e.patch.name, e.patch.version) == (name, version)), None)
        self.registry.unload(name, version)
        if entry is not None and entry.source.endswith(".safetensors"):
            (self.patch_dir / entry.source).unlink(missing_ok=True)
        log.info("ADMIN unload: %s@%s", name, version)

    def roll_back(self, name: str, version: int) -> list[str]:
        """Explicit operator rollback to ``name@version``; newer versions are unloaded and withdrawn."""
        unloaded = self.registry.roll_back(name, version)
        log.warning(
            "ADMIN rollback: %s to version %s (withdrawn: %s)",
            name,
            version,
            ", ".join(p.ref for p in unloaded) or "none",
        )
        return [p.ref for p in unloaded]

    def reload_tenants(self) -> str | None:
        """Re-read the tenant file; returns the refusal reason, or None when it was applied."""
        self.watcher.reload_tenants()
        return self.resolver.config_error
