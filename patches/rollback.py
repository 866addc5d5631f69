"""Rollback protection: per patch name, never accept a version below the highest one accepted.

State (persisted as JSON, so a restart does not reopen old versions)::

    {"patches": {"refusal": {"floor": 3, "live": {"2": "sha256:…", "3": "sha256:…"}}}}

* ``floor``: the highest version ever accepted for the name (or the operator's explicit rollback).
* ``live``: versions accepted and not retired, with their content digests. A version below the
  floor is accepted again only if it is in ``live`` with the same digest (for example the pinned
  older version of a canary rollout, re-read after a restart). Unloading a version retires it.
  A live version never changes content: a different file with the same name and version is refused.
* ``retired``: versions unloaded or superseded, with their digests (so a rollback can withdraw them).
* ``withdrawn``: digests of versions above an operator's rollback target; they are refused even if
  their file is still in the patch directory.

An operator's explicit rollback lowers the floor; it is the only way down, and it is logged.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from patches.errors import RollbackError
from patches.format import write_atomic

log = logging.getLogger(__name__)


class VersionGuard:
    """Version floors per patch name, persisted to ``path`` (``None``: in memory only, for tests)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._state: dict[str, dict] = {}
        if path is not None and path.exists():
            self._state = json.loads(path.read_text()).get("patches", {})

    def floor(self, name: str) -> int:
        return int(self._state.get(name, {}).get("floor", 0))

    def check(self, name: str, version: int, digest: str) -> None:
        """Raise :class:`RollbackError` if ``name@version`` would be a rollback."""
        entry = self._state.get(name, {})
        floor = int(entry.get("floor", 0))
        live = entry.get("live", {}).get(str(version))
        if digest in entry.get("withdrawn", []):
            raise RollbackError(f"patch {name}@{version} was withdrawn by an operator rollback")
        if live is not None and live != digest:
            raise RollbackError(
                f"patch {name}@{version} is already loaded with different content; publish it as a new version"
            )
        if version < floor and live != digest:
            raise RollbackError(
                f"patch {name}@{version} is older than {name}@{floor}, the highest version accepted; "
                "use the admin rollback API to go back deliberately"
            )

    def accept(self, name: str, version: int, digest: str) -> None:
        """Record an accepted version (call after :meth:`check`)."""
        with self._lock:
            entry = self._state.setdefault(name, {"floor": 0, "live": {}})
            entry["floor"] = max(int(entry["floor"]), version)
            entry["live"][str(version)] = digest
            self._save()

    def retire(self, name: str, version: int) -> None:
        """Forget a live version (unloaded or removed): below the floor it cannot come back."""
        with self._lock:
            entry = self._state.get(name, {})
            digest = entry.get("live", {}).pop(str(version), None)
            if digest is not None:
                entry.setdefault("retired", {})[str(version)] = digest
            self._save()

    def roll_back(self, name: str, version: int) -> None:
        """The operator's explicit rollback: lower the floor to ``version``; newer versions are withdrawn."""
        with self._lock:
            entry = self._state.setdefault(name, {"floor": 0, "live": {}})
            previous = entry["floor"]
            entry["floor"] = version
            known = {**entry.get("retired", {}), **entry["live"]}
            newer = [d for v, d in known.items() if int(v) > version]
            entry["withdrawn"] = sorted({*entry.get("withdrawn", []), *newer})
            entry["live"] = {v: d for v, d in entry["live"].items() if int(v) <= version}
            self._save()
        log.warning("ROLLBACK by operator: patch %s floor lowered from %s to %s", name, previous, version)

    def _save(self) -> None:
        if self._path is None:
            return
        write_atomic(self._path, json.dumps({"patches": self._state}, indent=2, sort_keys=True).encode())
