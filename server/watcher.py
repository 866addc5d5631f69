"""Hot loading: watch the patch directory and the tenant file, and apply changes without a restart.

A new or changed ``*.safetensors`` file is verified and published (or refused with its reason, the
previous version serving on); a removed file is unloaded unless a tenant's default stack needs it; a
changed tenant file is validated and swapped in whole, or refused. Built on ``watchfiles`` (inotify,
or polling for network volumes).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from watchfiles import Change, awatch

from patches.errors import PatchError
from patches.format import Patch
from patches.registry import PatchRegistry
from patches.signing import Verifier
from patches.tenants import load_tenants
from patches.trust import Revocations
from server.errors import APIError
from server.tenancy import TenantResolver

log = logging.getLogger(__name__)

# Kubernetes updates a mounted ConfigMap by swapping this symlink, not the file itself.
_CONFIGMAP_SWAP = "..data"


class PatchWatcher:
    """Applies file-system changes to the registry and the tenant resolver.

    Args:
        registry: Loaded patches.
        resolver: Holds the tenant configuration.
        patch_dir: Watched for ``*.safetensors`` files.
        tenants_file: Watched (through its directory) for changes.
    """

    def __init__(
        self,
        registry: PatchRegistry,
        resolver: TenantResolver,
        patch_dir: Path,
        tenants_file: Path,
        revocations: tuple[Verifier, Path] | None = None,
    ) -> None:
        self.registry = registry
        self.resolver = resolver
        self.patch_dir = patch_dir.resolve()
        self.tenants_file = tenants_file.resolve()
        self.verifier, revocations_file = revocations or (None, None)
        self.revocations_file = revocations_file.resolve() if revocations_file else None

    def relevant(self, _change: Change, raw: str) -> bool:
        """Only our files: patch files, the tenant file, the revocation list (and ConfigMap swaps)."""
        path = Path(raw)
        if path.parent == self.patch_dir:
            return path.suffix == ".safetensors" and not path.name.startswith(".")
        names = {_CONFIGMAP_SWAP}
        for watched in (self.tenants_file, self.revocations_file):
            if watched is not None and path.parent == watched.parent:
                names.add(watched.name)
        return path.name in names

    def apply(self, changes: set[tuple[Change, str]]) -> None:
        """Apply one batch of changes (blocking; run it in a thread)."""
        reload_tenants = reload_revocations = False
        for change, raw in sorted(changes, key=lambda c: c[1]):
            path = Path(raw)
            if path.parent == self.tenants_file.parent and path.name in (self.tenants_file.name, _CONFIGMAP_SWAP):
                reload_tenants = True
            rev = self.revocations_file
            if rev is not None and path.parent == rev.parent and path.name in (rev.name, _CONFIGMAP_SWAP):
                reload_revocations = True
            if path.parent != self.patch_dir or path.suffix != ".safetensors" or path.name.startswith("."):
                continue
            try:
                if change == Change.deleted or not path.exists():
                    self.registry.unload_source(path.name)
                else:
                    self.registry.load_file(path)
            except PatchError:
                continue  # recorded by the registry with its reason; the previous state serves on
        if reload_revocations:
            self.reload_revocations()
        if reload_tenants:
            self.reload_tenants()

    def reload_revocations(self) -> None:
        """Re-read the revocation list and unload every loaded patch it now revokes."""
        if self.verifier is None or self.revocations_file is None:
            return
        try:
            revocations = Revocations.load(self.revocations_file)
        except (OSError, ValueError) as exc:
            log.error("revocation list unreadable, previous list stays in force: %s", exc)
            return
        self.verifier.revocations = revocations

        def condemned(patch: Patch) -> str | None:
            if revocations.is_patch_revoked(patch.digest):
                return f"patch {patch.ref} ({patch.digest}) was revoked"
            if patch.meta.signer is not None and revocations.is_key_revoked(patch.meta.signer):
                return f"patch {patch.ref} is signed by revoked key {patch.meta.signer}"
            return None

        self.registry.purge(condemned)

    def reload_tenants(self) -> None:
        """Validate the tenant file and swap it in; keep the old one if it is invalid or unservable."""
        try:
            config = load_tenants(self.tenants_file)
            for tenant in config.tenants:
                self.resolver.resolve(tenant, None)  # every default stack loaded and signed acceptably
        except (PatchError, APIError) as exc:
            log.warning("tenant file refused, previous configuration stays: %s", exc)
            self.resolver.config_error = str(exc)
            return
        self.resolver.replace_config(config)
        log.info("tenant file reloaded: %d tenants", len(config.tenants))

    async def run(self, stop: asyncio.Event, *, polling: bool = False) -> None:
        """Watch until ``stop`` is set."""
        dirs = {self.patch_dir, self.tenants_file.parent}
        if self.revocations_file is not None:
            dirs.add(self.revocations_file.parent)
        paths = sorted(str(d) for d in dirs if d.is_dir())
        async for changes in awatch(
            *paths,
            watch_filter=self.relevant,
            stop_event=stop,
            debounce=50,
            step=10,
            recursive=False,
            force_polling=polling,
            poll_delay_ms=100,
        ):
            await asyncio.to_thread(self.apply, changes)
