"""The admin service behind ``/admin``: the listing, and operator changes handed to the control plane."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from pydantic import BaseModel

from patches.errors import PatchNotFound
from patches.registry import LoadedPatch
from server.control import ControlPlane

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
    withdrawn_versions: dict[str, list[int]]  # by operator rollbacks: refused wherever their files turn up
    state_serial: int
    state_error: str | None = None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AdminService:
    """Operator actions: every change goes through the control plane, and is logged there.

    Args:
        control: The one writer of registry, tenant and ledger state.
    """

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.registry = control.registry
        self.resolver = control.resolver

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
            version_floors={name: self.registry.ledger.floor(name) for name in sorted(self.registry.names())},
            withdrawn_versions=self.registry.ledger.withdrawn_versions(),
            state_serial=self.registry.ledger.serial,
            state_error=self.registry.ledger.error,
        )

    def upload(self, data: bytes) -> AdminPatch:
        """Verify an uploaded patch file, write it to the patch directory and publish it."""
        patch = self.control.upload(data)
        return next(self._info(e) for e in self.registry.entries() if e.patch.digest == patch.digest)

    def unload(self, name: str, version: int) -> None:
        """Unload a version and delete its file (so neither a restart nor the watcher brings it back)."""
        self.control.unload(name, version)

    def roll_back(self, name: str, version: int) -> list[str]:
        """Explicit operator rollback to ``name@version``; newer versions are unloaded and withdrawn."""
        return self.control.roll_back(name, version)

    def reload_tenants(self) -> str | None:
        """Re-read the tenant file; returns the refusal reason, or None when it was applied."""
        return self.control.reload_tenants()
