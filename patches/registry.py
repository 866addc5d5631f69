"""The registry of loaded patches: every accepted version of every name, resolved by reference.

Reading and validating a file happens outside the lock; publishing it is a reference swap under the
lock, so a resolver sees either the old or the new set, never a half-loaded one. A file that fails
validation is recorded with its reason and changes nothing that is serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from patches.errors import PatchNotFound, PatchRejected, RejectReason
from patches.format import Patch
from patches.stack import PatchRef

log = logging.getLogger(__name__)

PatchLoader = Callable[[Path], Patch]


@dataclass(frozen=True)
class LoadedPatch:
    """A patch as the registry holds it."""

    patch: Patch
    source: str
    loaded_at: float


@dataclass(frozen=True)
class Rejection:
    """A refused file, kept for the admin listing."""

    source: str
    reason: str
    message: str
    at: float = field(default_factory=time.time)


class PatchRegistry:
    """Loaded patches by name and version.

    Args:
        loader: Reads and validates one file (for example ``partial(load_patch, expect=spec)``, or
            a verifying loader); it raises :class:`PatchRejected` to refuse.
    """

    def __init__(self, loader: PatchLoader) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._patches: dict[str, dict[int, LoadedPatch]] = {}
        self._rejections: dict[str, Rejection] = {}

    def load_file(self, path: Path) -> Patch:
        """Validate ``path`` and publish it; on refusal record why and re-raise.

        Raises:
            PatchRejected: The file was refused; nothing that is serving changed.
        """
        try:
            patch = self._loader(path)
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
        self._publish(patch, path.name)
        return patch

    def load_dir(self, directory: Path) -> list[Patch]:
        """Load every ``*.safetensors`` file in ``directory``; refusals are logged and skipped."""
        loaded = []
        for path in sorted(directory.glob("*.safetensors")):
            try:
                loaded.append(self.load_file(path))
            except PatchRejected:
                continue
        return loaded

    def _publish(self, patch: Patch, source: str) -> None:
        entry = LoadedPatch(patch=patch, source=source, loaded_at=time.time())
        with self._lock:
            versions = dict(self._patches.get(patch.name, {}))
            versions[patch.version] = entry
            self._patches = {**self._patches, patch.name: versions}
            self._rejections.pop(source, None)
        log.info("patch %s loaded from %s (%s)", patch.ref, source, patch.digest[:19])

    def _reject(self, source: str, exc: PatchRejected) -> None:
        with self._lock:
            self._rejections[source] = Rejection(source=source, reason=str(exc.reason), message=str(exc))
        log.warning("patch file %s refused (%s): %s", source, exc.reason, exc)

    def resolve(self, ref: PatchRef) -> Patch:
        """The patch ``ref`` names: its exact version, or the newest loaded one.

        Raises:
            PatchNotFound: No such name, or no such version loaded.
        """
        return self.resolve_all([ref])[0]

    def resolve_all(self, refs: Iterable[PatchRef]) -> list[Patch]:
        """Resolve a whole stack against one snapshot of the registry."""
        snapshot = self._patches
        out = []
        for ref in refs:
            versions = snapshot.get(ref.name)
            if not versions:
                raise PatchNotFound(f"patch {ref.name!r} is not loaded")
            version = max(versions) if ref.version is None else ref.version
            if version not in versions:
                raise PatchNotFound(f"patch {ref} is not loaded (loaded versions: {sorted(versions)})")
            out.append(versions[version].patch)
        return out

    def entries(self) -> list[LoadedPatch]:
        """Every loaded version, sorted by name then version."""
        snapshot = self._patches
        return [snapshot[n][v] for n in sorted(snapshot) for v in sorted(snapshot[n])]

    def rejections(self) -> list[Rejection]:
        with self._lock:
            return sorted(self._rejections.values(), key=lambda r: r.source)

    def names(self) -> set[str]:
        return set(self._patches)
