"""The registry of loaded patches: every live version of every name, resolved by reference.

Reading, verifying and validating a file happen outside the lock. Every change (load, upload, unload,
rollback, purge) is one step under one lock: check against the shared version ledger, record in the
ledger, write the file (uploads), then publish, which is a reference swap of an immutable snapshot.
Resolvers read the snapshot without the lock and see either the old or the new set, never a
half-loaded one. A file or operation that fails any check, or whose ledger write fails, is recorded
with its reason and changes nothing that is serving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from patches.errors import PatchError, PatchNotFound, PatchRejected, RejectReason, StateError
from patches.format import Patch, read_regular_file
from patches.oms import read_bundle
from patches.rollback import VersionLedger
from patches.stack import PatchRef

log = logging.getLogger(__name__)

# loader(data), or loader(data, bundle=...) for a file with a detached OMS bundle beside it (patches.oms)
PatchLoader = Callable[..., Patch]
# (tenant id, its default stack) for every tenant: what an unload must not break.
PinnedStacks = Callable[[], Iterable[tuple[str, list[PatchRef]]]]
Snapshot = Mapping[str, Mapping[int, "LoadedPatch"]]


class RegistryListener(Protocol):
    """Told about every version made live and every refusal (the server's metrics implement it)."""

    def published(self, patch: Patch, seconds: float) -> None:
        """``patch`` went live ``seconds`` after its bytes were received."""

    def rejected(self, reason: str) -> None:
        """A file or operation was refused for ``reason`` (a :class:`RejectReason` value)."""


@dataclass(frozen=True)
class LoadedPatch:
    """A patch as the registry holds it."""

    patch: Patch
    source: str
    loaded_at: float


@dataclass(frozen=True)
class Rejection:
    """A refused file or operation, kept for the admin listing."""

    source: str
    reason: str
    message: str
    at: float = field(default_factory=time.time)


def _resolve(snapshot: Snapshot, refs: Iterable[PatchRef]) -> list[LoadedPatch]:
    out = []
    for ref in refs:
        versions = snapshot.get(ref.name)
        if not versions:
            raise PatchNotFound(f"patch {ref.name!r} is not loaded")
        version = max(versions) if ref.version is None else ref.version
        if version not in versions:
            raise PatchNotFound(f"patch {ref} is not loaded (loaded versions: {sorted(versions)})")
        out.append(versions[version])
    return out


class PatchRegistry:
    """Loaded patches by name and version.

    Args:
        loader: Verifies and validates one file's bytes (and its OMS bundle, given one); raises
            :class:`PatchRejected` to refuse.
        ledger: The shared version ledger (default: in memory only).
        pinned: The tenants' default stacks; an unload that would change what one serves is refused.
    """

    def __init__(
        self, loader: PatchLoader, ledger: VersionLedger | None = None, pinned: PinnedStacks | None = None
    ) -> None:
        self._loader = loader
        self.ledger = ledger or VersionLedger(None)
        self.pinned: PinnedStacks = pinned or (lambda: [])
        self.lock = threading.RLock()  # the control-plane lock: every change to what serves holds it
        self._patches: dict[str, dict[int, LoadedPatch]] = {}
        self._rejections: dict[str, Rejection] = {}
        self.listeners: list[RegistryListener] = []

    # -- loading ---------------------------------------------------------------------------------
    def load_file(self, path: Path) -> Patch:
        """Verify ``path`` and publish it; on refusal record why and re-raise.

        A file that replaces another version from the same source supersedes it (the old version is
        unloaded unless a tenant's default stack pins it). Loading the identical content again is a
        no-op.

        Raises:
            PatchRejected: The file was refused; nothing that is serving changed.
            StateError: The ledger could not be written; nothing changed.
        """
        started = time.perf_counter()
        patch = self._read(path)
        self._admit(patch, path.name, started)
        return patch

    def load_bytes(self, data: bytes, directory: Path) -> Patch:
        """Verify uploaded bytes, record them in the ledger, write them to ``directory`` as
        ``<name>-v<version>.safetensors`` and publish them, as one step. A refused upload writes nothing.

        Raises:
            PatchRejected: Refused; nothing changed.
            StateError: The ledger or the file could not be written; nothing changed.
        """
        started = time.perf_counter()
        try:
            patch = self._loader(data)
        except PatchRejected as exc:
            self._reject("upload", exc)
            raise
        self._admit(patch, f"{patch.name}-v{patch.version}.safetensors", started, (directory, data))
        return patch

    def load_dir(self, directory: Path) -> list[Patch]:
        """Load every ``*.safetensors`` file in ``directory``, oldest version first; refusals are skipped.

        Raises:
            StateError: The ledger cannot be written (start-up must not go on without it).
        """
        read = []
        for path in sorted(directory.glob("*.safetensors")):
            if path.name.startswith("."):  # temporary files of atomic writes
                continue
            started = time.perf_counter()
            try:
                read.append((self._read(path), path.name, started))
            except PatchRejected:
                continue
        loaded = []
        for patch, source, started in sorted(read, key=lambda item: (item[0].name, item[0].version)):
            try:
                self._admit(patch, source, started)
                loaded.append(patch)
            except PatchRejected:
                continue
        return loaded

    def _read(self, path: Path) -> Patch:
        try:
            data, bundle = read_regular_file(path), read_bundle(path)
            return self._loader(data) if bundle is None else self._loader(data, bundle=bundle)
        except PatchRejected as exc:
            self._reject(path.name, exc)
            raise
        except OSError as exc:
            rejected = PatchRejected(RejectReason.truncated, f"cannot read {path.name}: {exc.strerror}")
            self._reject(path.name, rejected)
            raise rejected from exc
        except Exception as exc:  # a loader bug must not stop the directory scan or the server
            rejected = PatchRejected(RejectReason.bad_format, f"{path.name} could not be parsed ({type(exc).__name__})")
            self._reject(path.name, rejected)
            raise rejected from exc

    def _admit(self, patch: Patch, source: str, started: float, upload: tuple[Path, bytes] | None = None) -> None:
        """Check, record, persist and publish under the control-plane lock: the ledger moves only when
        its write succeeded, and memory only when the ledger (and the upload's file) did."""
        with self.lock:
            current = self._patches.get(patch.name, {}).get(patch.version)
            same = current is not None and current.patch.digest == patch.digest
            if same and (upload is None or (upload[0] / source).is_file()):
                self._rejections.pop(source, None)
                return
            snapshot = {name: dict(versions) for name, versions in self._patches.items()}
            superseded = [
                old
                for versions in snapshot.values()
                for old in versions.values()
                if old.source == source and (old.patch.name, old.patch.version) != (patch.name, patch.version)
            ]
            entry = LoadedPatch(patch=patch, source=source, loaded_at=time.time())
            snapshot.setdefault(patch.name, {})[patch.version] = entry
            retired = []
            for old in superseded:
                after = self._without(snapshot, old.patch.name, old.patch.version)
                if self._blocking(after, snapshot):
                    continue  # pinned by a tenant: stays in memory although its file changed
                snapshot = after
                retired.append((old.patch.name, old.patch.version, old.patch.digest))
            tmp = self._stage(upload, source) if upload is not None else None
            try:
                self.ledger.admit(patch.name, patch.version, patch.digest, retire=retired)
                if tmp is not None:
                    tmp.replace(tmp.with_name(source))
            except PatchRejected as exc:
                self._reject("upload" if upload else source, exc)
                raise
            except (StateError, OSError) as exc:
                error = exc if isinstance(exc, StateError) else StateError(f"cannot write {source}: {exc.strerror}")
                self._failed("upload" if upload else source, error)
                raise error from exc
            finally:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
            self._patches = snapshot
            self._rejections.pop(source, None)
        log.info("patch %s loaded from %s (%s)", patch.ref, source, patch.digest[:19])
        seconds = time.perf_counter() - started
        for listener in self.listeners:
            listener.published(patch, seconds)

    def _stage(self, upload: tuple[Path, bytes], source: str) -> Path:
        """Write an upload to a hidden temporary file beside its final name (renamed once admitted)."""
        directory, data = upload
        tmp = directory / f".{source}.{os.getpid()}.{uuid.uuid4().hex[:8]}.upload"
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            error = StateError(f"cannot write {source} to the patch directory: {exc.strerror}")
            self._failed("upload", error)
            raise error from exc
        return tmp

    def _failed(self, source: str, exc: PatchError) -> None:
        log.error("patch change from %s failed, nothing changed: %s", source, exc)
        self.notify_rejected("state_write")

    def _reject(self, source: str, exc: PatchRejected) -> None:
        with self.lock:
            self._rejections[source] = Rejection(source=source, reason=str(exc.reason), message=str(exc))
        log.warning("patch file %s refused (%s): %s", source, exc.reason, exc)
        self.notify_rejected(exc.reason)

    def notify_rejected(self, reason: str) -> None:
        for listener in self.listeners:
            listener.rejected(str(reason))

    # -- unloading -------------------------------------------------------------------------------
    @staticmethod
    def _without(snapshot: Snapshot, name: str, version: int) -> dict[str, dict[int, LoadedPatch]]:
        out = {n: dict(v) for n, v in snapshot.items()}
        out.get(name, {}).pop(version, None)
        return {n: v for n, v in out.items() if v}

    def _blocking(self, after: Snapshot, before: Snapshot | None = None) -> list[str]:
        """Tenants whose default stack would not resolve in ``after``, or (given ``before``) would
        resolve to other content than in ``before``: only publishing and rollback change what serves."""
        blocked = []
        for tenant, refs in self.pinned():
            try:
                now = [e.patch.digest for e in _resolve(after, refs)]
            except PatchNotFound:
                blocked.append(tenant)
                continue
            if before is not None:
                try:
                    was = [e.patch.digest for e in _resolve(before, refs)]
                except PatchNotFound:
                    continue
                if now != was:
                    blocked.append(tenant)
        return blocked

    def unload(self, name: str, version: int, *, source: str | None = None) -> Patch:
        """Unload ``name@version`` and retire it (it cannot come back below the version floor).

        An operator unload (``source`` None) may not change what any tenant's default stack serves:
        unloading the newest version of a name a tenant follows would fall back to an older one, which
        is a rollback and must use :meth:`roll_back`. A removed file (``source`` given: the directory is
        the truth, as after a restart) may fall back, with a warning naming the tenants.

        Raises:
            PatchNotFound: Not loaded.
            PatchRejected: ``in_use`` when a default stack would no longer resolve, or (operator
                unload) would resolve to other content.
            StateError: The ledger could not be written; nothing changed.
        """
        with self.lock:
            entry = self._patches.get(name, {}).get(version)
            if entry is None:
                raise PatchNotFound(f"patch {name}@{version} is not loaded")
            after = self._without(self._patches, name, version)
            broken = self._blocking(after)
            moved = [t for t in self._blocking(after, self._patches) if t not in broken]
            if broken or (moved and source is None):
                exc = PatchRejected(
                    RejectReason.in_use,
                    f"patch {name}@{version} is served by the default stack of tenant(s) "
                    f"{', '.join(broken or moved)}; publish a new version"
                    + (", or use the rollback API to go back to an older one" if not broken else ""),
                )
                self._rejections[source or entry.source] = Rejection(entry.source, str(exc.reason), str(exc))
                log.warning("unload of %s@%s refused: %s", name, version, exc)
                self.notify_rejected(exc.reason)
                raise exc
            self.ledger.retire(name, version, entry.patch.digest)
            self._patches = after
        if moved:
            log.warning("file of %s@%s removed: tenant(s) %s fall back to an older version", name, version, moved)
        log.info("patch %s@%s unloaded", name, version)
        return entry.patch

    def unload_source(self, source: str) -> list[Patch]:
        """Unload what was loaded from file ``source`` (the file was removed)."""
        with self.lock:
            entries = [e for e in self.entries() if e.source == source]
            self._rejections.pop(source, None)
            return [self.unload(e.patch.name, e.patch.version, source=source) for e in entries]

    def purge(
        self, condemned: Callable[[Patch], str | None], reason: RejectReason = RejectReason.revoked
    ) -> list[Patch]:
        """Force-unload every patch for which ``condemned`` gives a reason (a revocation or another
        replica's rollback), even one a tenant's default stack pins: this fails closed, and that tenant
        gets 503 until fixed. Purged versions are not retired: the ledger or revocation list already
        refuses them."""
        purged = []
        with self.lock:
            snapshot = {name: dict(versions) for name, versions in self._patches.items()}
            for versions in snapshot.values():
                for version, entry in list(versions.items()):
                    why = condemned(entry.patch)
                    if why is None:
                        continue
                    del versions[version]
                    self._rejections[entry.source] = Rejection(entry.source, str(reason), why)
                    purged.append(entry.patch)
                    log.warning("patch %s unloaded: %s", entry.patch.ref, why)
            self._patches = {name: versions for name, versions in snapshot.items() if versions}
        for _ in purged:
            self.notify_rejected(reason)
        return purged

    def sync(self) -> list[Patch]:
        """Re-read the shared ledger (other replicas' changes) and unload what it now withdraws.

        Raises:
            StateError: The ledger cannot be read; the last good state stays in force.
        """
        with self.lock:
            seen = self.ledger.serial
            self.ledger.refresh()
            if self.ledger.serial == seen:
                return []  # nothing written since: every loaded version passed the ledger when admitted
            withdrawn = self.ledger.withdrawn()
            return self.purge(
                lambda p: f"patch {p.ref} was withdrawn by an operator rollback" if p.digest in withdrawn else None,
                RejectReason.rollback,
            )

    def roll_back(self, name: str, version: int) -> list[Patch]:
        """Operator rollback: withdraw every version above ``version`` in the ledger and unload them.

        Raises:
            PatchNotFound: ``name@version`` is not loaded (roll back only to something that serves).
            PatchRejected: ``in_use`` when a newer version is pinned exactly by a tenant's default stack.
            StateError: The ledger could not be written; nothing changed.
        """
        with self.lock:
            self.resolve(PatchRef(name, version))
            after = self._patches
            for v in sorted(v for v in self._patches.get(name, {}) if v > version):
                after = self._without(after, name, v)
                if self._blocking(after):
                    raise PatchRejected(RejectReason.in_use, f"patch {name}@{v} is pinned by a tenant's default stack")
            withdrawn = set(self.ledger.roll_back(name, version))
            newer = [e.patch for e in self.entries() if e.patch.name == name and e.patch.version > version]
            self._patches = after
        for patch in newer:
            log.info("patch %s unloaded by rollback (withdrawn: %s)", patch.ref, patch.digest in withdrawn)
        return newer

    # -- resolution ------------------------------------------------------------------------------
    def resolve(self, ref: PatchRef) -> Patch:
        """The patch ``ref`` names: its exact version, or the newest loaded one.

        Raises:
            PatchNotFound: No such name, or no such version loaded.
        """
        return self.resolve_all([ref])[0]

    def resolve_all(self, refs: Iterable[PatchRef]) -> list[Patch]:
        """Resolve a whole stack against one snapshot of the registry."""
        return [entry.patch for entry in _resolve(self._patches, refs)]

    def entries(self) -> list[LoadedPatch]:
        """Every loaded version, sorted by name then version."""
        snapshot = self._patches
        return [snapshot[n][v] for n in sorted(snapshot) for v in sorted(snapshot[n])]

    def rejections(self) -> list[Rejection]:
        with self.lock:
            return sorted(self._rejections.values(), key=lambda r: r.source)

    def names(self) -> set[str]:
        return set(self._patches)
