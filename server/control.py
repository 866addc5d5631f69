"""The control plane: the one writer of what the server serves.

Every change — a patch file added, changed or removed, an upload, an unload, a rollback, a tenant
file or revocation list reload, another replica's ledger change — goes through :class:`ControlPlane`,
under the registry's control-plane lock, whether it comes from the watcher, the admin API or start-up.
The invariants the server enforces at start-up are the ones it enforces on every reload
(:meth:`ControlPlane.check_tenants`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from patches.errors import PatchError, PatchNotFound, StateError, TenantConfigError
from patches.format import Patch
from patches.oms import bundle_path
from patches.registry import PatchRegistry
from patches.signing import Verifier
from patches.tenants import TenantConfig, load_tenants
from patches.trust import Revocations
from server.tenancy import TenantResolver

log = logging.getLogger(__name__)

FileIdentity = tuple[int, ...]


def file_identity(path: Path) -> FileIdentity | None:
    """(device, inode, size, mtime) of what ``path`` names now, then the same for its OMS bundle (zeros
    without one), or None if ``path`` cannot be stat-ed: a file or bundle replaced by a rename or
    rewritten in place gets a new identity."""
    try:
        st = path.stat()
    except OSError:
        return None
    try:
        sig = bundle_path(path).stat()
        bundle = (sig.st_dev, sig.st_ino, sig.st_size, sig.st_mtime_ns)
    except OSError:
        bundle = (0, 0, 0, 0)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, *bundle


class ControlPlane:
    """Applies changes to the registry, the tenant resolver and the revocation list.

    Args:
        registry: Loaded patches (its lock is the control-plane lock).
        resolver: Holds the tenant configuration.
        patch_dir: Where uploads are written and files are loaded from.
        tenants_file: The tenant configuration file.
        verifier: Holds the revocation list (with ``revocations_file``).
        admin_key_hash: ``sha256:…`` of the admin token: never a tenant key.
        dev_mode: Allow a tenant file without API keys (header-picked tenants).
    """

    def __init__(
        self,
        registry: PatchRegistry,
        resolver: TenantResolver,
        *,
        patch_dir: Path,
        tenants_file: Path,
        verifier: Verifier | None = None,
        revocations_file: Path | None = None,
        admin_key_hash: str | None = None,
        dev_mode: bool = False,
    ) -> None:
        self.registry = registry
        self.resolver = resolver
        self.patch_dir = patch_dir
        self.tenants_file = tenants_file
        self.verifier = verifier
        self.revocations_file = revocations_file
        self.admin_key_hash = admin_key_hash
        self.dev_mode = dev_mode
        # patch file name -> its identity when it was last read; written only by load_all and
        # file_changed (start-up, then the watcher's thread)
        self._read: dict[str, FileIdentity] = {}

    # -- tenants ---------------------------------------------------------------------------------
    def check_tenants(self, config: TenantConfig, *, at_start: bool = False) -> None:
        """The tenant-file invariants, at start-up and on every reload.

        Raises:
            TenantConfigError: The admin token is a tenant key; the file has no API keys outside dev
                mode while keys are in use (that would let ``X-Tenant-Id`` pick any tenant); or a
                default stack does not resolve (not at start-up, when patches may still be missing).
        """
        if self.admin_key_hash is not None and any(self.admin_key_hash in t.api_keys for t in config.tenants):
            raise TenantConfigError("the admin token is also a tenant API key; the admin API never accepts tenant keys")
        if not at_start and not config.uses_keys and self.resolver.config.uses_keys and not self.dev_mode:
            raise TenantConfigError(
                "the new tenant file lists no API keys: that would let X-Tenant-Id pick any tenant; "
                "allowed only with PATCHSERVE_DEV_MODE=1"
            )
        if not at_start:
            problems = self.resolver.unservable(config)
            if problems:
                raise TenantConfigError("; ".join(problems))

    def reload_tenants(self) -> str | None:
        """Validate the tenant file and swap it in; keep the old one if it is refused. Returns the
        refusal reason, or None when the file was applied."""
        with self.registry.lock:
            try:
                config = load_tenants(self.tenants_file)
                self.check_tenants(config)
            except PatchError as exc:
                log.warning("tenant file refused, previous configuration stays: %s", exc)
                self.resolver.config_error = str(exc)
                self.registry.notify_rejected("tenant_config")
                return str(exc)
            if not config.uses_keys:
                log.warning("tenant file has no API keys: tenants are picked by X-Tenant-Id (dev mode)")
            self.resolver.replace_config(config)
        log.info("tenant file reloaded: %d tenants", len(config.tenants))
        return None

    def reload_revocations(self) -> None:
        """Re-read the revocation list and unload every loaded patch it now revokes."""
        if self.verifier is None or self.revocations_file is None:
            return
        with self.registry.lock:
            try:
                revocations = Revocations.load(self.revocations_file)
            except (OSError, ValueError) as exc:
                log.error("revocation list unreadable, previous list stays in force: %s", exc)
                self.registry.notify_rejected("revocations")
                return
            self.verifier.revocations = revocations

            def condemned(patch: Patch) -> str | None:
                if revocations.is_patch_revoked(patch.digest):
                    return f"patch {patch.ref} ({patch.digest}) was revoked"
                if patch.meta.signer is not None and revocations.is_key_revoked(patch.meta.signer):
                    return f"patch {patch.ref} is signed by revoked key {patch.meta.signer}"
                return None

            self.registry.purge(condemned)

    # -- patches ---------------------------------------------------------------------------------
    def load_all(self) -> None:
        """Start-up: load every patch file in the directory (refusals are recorded and skipped).

        Raises:
            StateError: The ledger cannot be written (start-up must not go on without it).
        """
        names = [p for p in self.patch_dir.glob("*.safetensors") if not p.name.startswith(".")]
        seen = {p.name: file_identity(p) for p in names}  # before reading: a file changed meanwhile reloads
        self.registry.load_dir(self.patch_dir)
        self._read.update({name: ident for name, ident in seen.items() if ident is not None})

    def file_changed(self, path: Path, *, only_if_new: bool = False) -> None:
        """A patch file appeared, changed or disappeared: load it or unload what it held.

        ``only_if_new`` (a rescan): skip a file whose identity is the one last read, verified or refused.
        A ledger write failure leaves the file unread, so the next rescan tries it again.
        """
        identity = file_identity(path)
        if only_if_new and identity is not None and self._read.get(path.name) == identity:
            return
        try:
            if path.exists() or path.is_symlink():
                self._read.pop(path.name, None)
                self.registry.load_file(path)
            else:
                self._read.pop(path.name, None)
                self.registry.unload_source(path.name)
        except StateError:
            return  # logged and counted by the registry; retried by the next rescan
        except PatchError:
            pass  # recorded by the registry with its reason; the previous state serves on
        if identity is not None:
            self._read[path.name] = identity

    def upload(self, data: bytes) -> Patch:
        """Verify an uploaded patch file, record it, write it to the patch directory and publish it."""
        patch = self.registry.load_bytes(data, self.patch_dir)
        log.info("ADMIN upload: %s (%s)", patch.ref, patch.digest)
        return patch

    def unload(self, name: str, version: int) -> None:
        """Unload a version and delete its file (so neither a restart nor the watcher brings it back)."""
        with self.registry.lock:
            entry = next(
                (e for e in self.registry.entries() if (e.patch.name, e.patch.version) == (name, version)), None
            )
            if entry is None:
                raise PatchNotFound(f"patch {name}@{version} is not loaded")
            self.registry.unload(name, version)
            if entry.source.endswith(".safetensors"):
                (self.patch_dir / entry.source).unlink(missing_ok=True)
                bundle_path(self.patch_dir / entry.source).unlink(missing_ok=True)
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

    def sync_state(self) -> None:
        """Pick up other replicas' ledger changes (rollbacks); raises StateError if unreadable."""
        for patch in self.registry.sync():
            log.warning("patch %s unloaded: withdrawn by a rollback on another replica", patch.ref)
