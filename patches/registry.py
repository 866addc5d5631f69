"""The registry of loaded patches: every live version of every name, resolved by reference.

Reading, verifying and validating a file happen outside the lock; publishing is a reference swap of
an immutable snapshot under the lock, so a resolver sees either the old or the new set, never a
half-loaded one. A file that fails any check (including the rollback guard) is recorded with its
reason and changes nothing that is serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from patches.errors import PatchNotFound, PatchRejected, RejectReason
from patches.format import Patch
from patches.rollback import VersionGuard
from patches.stack import PatchRef

log = logging.getLogger(__name__)

PatchLoader = Callable[[bytes], Patch]
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
        loader: Verifies and validates one file's bytes; raises :class:`PatchRejected` to refuse.
        guard: Rollback protection (default: in memory only).
        pinned: The tenants' default stacks; an unload that would break one is refused.
    """

    def __init__(
        self, loader: PatchLoader, guard: VersionGuard | None = None, pinned: PinnedStacks | None = None
    ) -> None:
        self._loader = loader
        self.guard = guard or VersionGuard(None)
        self.pinned: PinnedStacks = pinned or (lambda: [])
        self._lock = threading.Lock()
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
        """
        started = time.perf_counter()
        patch = self._read(path)
        self._admit(patch, path.name, started)
        return patch

    def load_bytes(self, data: bytes, persist: Callable[[Patch], str]) -> Patch:
        """Verify uploaded bytes and publish them. ``persist`` runs after every check and before
        publishing (it writes the file and returns its name, the entry's source), so a refused upload
        writes nothing.

        Raises:
            PatchRejected: Refused; nothing changed.
        """
        started = time.perf_counter()
        try:
            patch = self._loader(data)
        except PatchRejected as exc:
            self._reject("upload", exc)
            raise
        self._admit(patch, "upload", started, persist)
        return patch

    def load_dir(self, directory: Path) -> list[Patch]:
        """Load every ``*.safetensors`` file in ``directory``, oldest version first; refusals are skipped."""
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
            return self._loader(path.read_bytes())
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

    def _admit(self, patch: Patch, source: str, started: float, persist: Callable[[Patch], str] | None = None) -> None:
        try:
            self.guard.check(patch.name, patch.version, patch.digest)
        except PatchRejected as exc:
            self._reject(source, exc)
            raise
        if persist is not None:
            source = persist(patch)
        self._publish(patch, source, started)

    def _publish(self, patch: Patch, source: str, started: float) -> None:
        entry = LoadedPatch(patch=patch, source=source, loaded_at=time.time())
        with self._lock:
            current = self._patches.get(patch.name, {}).get(patch.version)
            if current is not None and current.patch.digest == patch.digest:
                self._rejections.pop(source, None)
                return
            snapshot = {name: dict(versions) for name, versions in self._patches.items()}
            superseded = [
                (name, version)
                for name, versions in snapshot.items()
                for version, old in versions.items()
                if old.source == source and (name, version) != (patch.name, patch.version)
            ]
            snapshot.setdefault(patch.name, {})[patch.version] = entry
            for name, version in superseded:
                if self._blocking(self._without(snapshot, name, version)):
                    continue  # pinned by a tenant: stays in memory although its file changed
                del snapshot[name][version]
                if not snapshot[name]:
                    del snapshot[name]
                self.guard.retire(name, version)
            self.guard.accept(patch.name, patch.version, patch.digest)
            self._patches = snapshot
            self._rejections.pop(source, None)
        log.info("patch %s loaded from %s (%s)", patch.ref, source, patch.digest[:19])
        seconds = time.perf_counter() - started
        for listener in self.listeners:
            listener.published(patch, seconds)

    def _reject(self, source: str, exc: PatchRejected) -> None:
        with self._lock:
            self._rejections[source] = Rejection(source=source, reason=str(exc.reason), message=str(exc))
        log.warning("patch file %s refused (%s): %s", source, exc.reason, exc)
        self._notify_rejected(exc.reason)

    def _notify_rejected(self, reason: str) -> None:
        for listener in self.listeners:
            listener.rejected(str(reason))

    # -- unloading -------------------------------------------------------------------------------
    @staticmethod
    def _without(snapshot: Snapshot, name: str, version: int) -> dict[str, dict[int, LoadedPatch]]:
        out = {n: dict(v) for n, v in snapshot.items()}
        out.get(name, {}).pop(version, None)
        return {n: v for n, v in out.items() if v}

    def _blocking(self, snapshot: Snapshot) -> list[str]:
        blocked = []
        for tenant, refs in self.pinned():
            try:
                _resolve(snapshot, refs)
            except PatchNotFound:
                blocked.append(tenant)
        return blocked

    def unload(self, name: str, version: int, *, source: str | None = None) -> Patch:
        """Unload ``name@version`` and retire it (it cannot come back below the version floor).

        Raises:
            PatchNotFound: Not loaded.
            PatchRejected: ``in_use`` when a tenant's default stack needs it.
        """
        with self._lock:
            entry = self._patches.get(name, {}).get(version)
            if entry is None:
                raise PatchNotFound(f"patch {name}@{version} is not loaded")
            after = self._without(self._patches, name, version)
            blocked = self._blocking(after)
            if blocked:
                exc = PatchRejected(
                    RejectReason.in_use,
                    f"patch {name}@{version} is still needed by the default stack of tenant(s) {', '.join(blocked)}",
                )
                self._rejections[source or entry.source] = Rejection(entry.source, str(exc.reason), str(exc))
                log.warning("unload of %s@%s refused: %s", name, version, exc)
            else:
                exc = None
                self._patches = after
                self.guard.retire(name, version)
        if exc is not None:
            self._notify_rejected(exc.reason)
            raise exc
        log.info("patch %s@%s unloaded", name, version)
        return entry.patch

    def unload_source(self, source: str) -> list[Patch]:
        """Unload what was loaded from file ``source`` (the file was removed)."""
        entries = [e for e in self.entries() if e.source == source]
        self._rejections.pop(source, None)
        return [self.unload(e.patch.name, e.patch.version, source=source) for e in entries]

    def purge(self, condemned: Callable[[Patch], str | None]) -> list[Patch]:
        """Force-unload every patch for which ``condemned`` gives a reason (a revocation), even one a
        tenant's default stack pins: revocation fails closed, and that tenant gets 503 until fixed.
        """
        purged = []
        with self._lock:
            snapshot = {name: dict(versions) for name, versions in self._patches.items()}
            for name, versions in list(snapshot.items()):
                for version, entry in list(versions.items()):
                    reason = condemned(entry.patch)
                    if reason is None:
                        continue
                    del versions[version]
                    self.guard.retire(name, version)
                    self._rejections[entry.source] = Rejection(entry.source, str(RejectReason.revoked), reason)
                    purged.append(entry.patch)
                    log.warning("patch %s unloaded: %s", entry.patch.ref, reason)
            self._patches = {name: versions for name, versions in snapshot.items() if versions}
        for _ in purged:
            self._notify_rejected(RejectReason.revoked)
        return purged

    def roll_back(self, name: str, version: int) -> list[Patch]:
        """Operator rollback: lower the floor to ``version`` and unload every newer loaded version.

        Raises:
            PatchNotFound: ``name@version`` is not loaded (roll back only to something that serves).
            PatchRejected: ``in_use`` when a newer version is pinned by a tenant's default stack.
        """
        self.resolve(PatchRef(name, version))
        newer = sorted(v for v in self._patches.get(name, {}) if v > version)
        for v in newer:
            if self._blocking(self._without(self._patches, name, v)):
                raise PatchRejected(RejectReason.in_use, f"patch {name}@{v} is pinned by a tenant's default stack")
        self.guard.roll_back(name, version)
        return [self.unload(name, v) for v in newer]

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
        with self._lock:
            return sorted(self._rejections.values(), key=lambda r: r.source)

    def names(self) -> set[str]:
        return set(self._patches)
