"""Rollback protection shared by every replica: a version ledger on the shared volume.

State (``versions.json`` in the state dir, beside the patch dir on the same volume)::

    {"format": 2, "serial": 17, "patches": {"refusal": {
        "versions": {"2": "sha256:…", "3": "sha256:…"},   # every version ever accepted → its content
        "retired": {"sha256:…": 2},                       # unloaded or superseded (digest → version)
        "withdrawn": {"sha256:…": 3}}}}                   # above an operator's rollback target

Rules, for ``name@version`` with content ``digest``:

* A version never changes content: once ``versions`` maps it to a digest, other content under the same
  version is refused, even after the version was deleted or withdrawn. A fix is a new version.
* Withdrawn digests are refused, wherever their file turns up.
* The floor is the highest accepted version not withdrawn. Below it, a version is accepted only if it
  is the same content and not retired: the pinned older version of a canary, re-read after a restart.
* An operator rollback to ``version`` withdraws every newer version; it is the only way the floor goes
  down, and it is logged.

Why a ledger and not per-pod state: replicas share the patch directory, so they must share what the
directory may serve. Every change is a read-modify-write of the file under an exclusive ``flock``
(``filelock``) plus an atomic rename, so concurrent writers on any replica serialise and none can erase
another's change (merge-on-write: each write starts from the current file, never from memory). The
in-memory copy only changes after the file write succeeded, so a failed write moves no floor. Replicas
pick up other replicas' changes with :meth:`VersionLedger.refresh` (the server polls it) and unload
what was withdrawn. A missing file is a fresh start; a file that cannot be read or parsed refuses to
load (:class:`StateError`), never a silent reset to floor 0.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from patches.errors import RollbackError, StateError
from patches.format import write_atomic

log = logging.getLogger(__name__)

FORMAT = 2
_LOCK_TIMEOUT_S = 10.0

State = dict[str, Any]


def _empty() -> State:
    return {"format": FORMAT, "serial": 0, "patches": {}}


def _from_v1(patches: dict[str, dict]) -> State:
    """Format 1 (``floor``/``live``/``retired``/``withdrawn`` per name) → format 2."""
    out = _empty()
    for name, entry in patches.items():
        retired = {str(v): d for v, d in entry.get("retired", {}).items()}
        live = {str(v): d for v, d in entry.get("live", {}).items()}
        withdrawn = set(entry.get("withdrawn", []))
        versions = {**retired, **live}
        out["patches"][name] = {
            "versions": versions,
            "retired": {d: int(v) for v, d in retired.items() if v not in live},
            "withdrawn": {d: int(v) for v, d in versions.items() if d in withdrawn},
        }
    return out


def parse_state(raw: bytes, where: str) -> State:
    """Parse a state file's bytes; raise :class:`StateError` for anything that is not a ledger."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"version state {where} is not valid JSON ({exc}); refusing to reset it") from exc
    if not isinstance(data, dict) or not isinstance(data.get("patches"), dict):
        raise StateError(f"version state {where} has no 'patches' object; refusing to reset it")
    if "format" not in data:
        return _from_v1(data["patches"])
    if data["format"] != FORMAT or not isinstance(data.get("serial"), int):
        raise StateError(f"version state {where} has unknown format {data.get('format')!r}")
    for name, entry in data["patches"].items():
        if not all(isinstance(entry.get(k), dict) for k in ("versions", "retired", "withdrawn")):
            raise StateError(f"version state {where}: entry {name!r} is malformed")
    return data


def _floor(entry: dict) -> int:
    withdrawn = entry["withdrawn"]
    return max((int(v) for v, d in entry["versions"].items() if d not in withdrawn), default=0)


def _entry(state: State, name: str) -> dict:
    return state["patches"].setdefault(name, {"versions": {}, "retired": {}, "withdrawn": {}})


def _check(state: State, name: str, version: int, digest: str) -> None:
    entry = state["patches"].get(name)
    if entry is None:
        return
    known = entry["versions"].get(str(version))
    if digest in entry["withdrawn"]:
        raise RollbackError(f"patch {name}@{version} ({digest[:19]}…) was withdrawn by an operator rollback")
    if known is not None and known != digest:
        newest = max(int(v) for v in entry["versions"])
        raise RollbackError(
            f"patch {name}@{version} was already published with other content ({known[:19]}…); a version "
            f"never changes content: publish it as a new version above {name}@{newest}"
        )
    floor = _floor(entry)
    if version < floor and (known != digest or digest in entry["retired"]):
        raise RollbackError(
            f"patch {name}@{version} is older than {name}@{floor}, the highest version accepted; "
            "use the admin rollback API to go back deliberately"
        )


class VersionLedger:
    """The shared version ledger at ``path`` (``None``: in memory only, for tests and one-off tools).

    Raises:
        StateError: The file exists but cannot be read or parsed.
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._file_lock = FileLock(str(path) + ".lock", timeout=_LOCK_TIMEOUT_S) if path else None
        self._state = self._read() if path is not None else _empty()
        self.error: str | None = None  # why the last refresh failed, for /readyz

    # -- reading ---------------------------------------------------------------------------------
    def _read(self) -> State:
        assert self._path is not None
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return _empty()
        except OSError as exc:
            raise StateError(f"version state {self._path} cannot be read: {exc.strerror}") from exc
        return parse_state(raw, str(self._path))

    @property
    def serial(self) -> int:
        """Changes ever written to the ledger, by any replica, as of the last read."""
        return int(self._state["serial"])

    def floor(self, name: str) -> int:
        entry = self._state["patches"].get(name)
        return _floor(entry) if entry else 0

    def withdrawn(self) -> set[str]:
        return {d for entry in self._state["patches"].values() for d in entry["withdrawn"]}

    def withdrawn_versions(self) -> dict[str, list[int]]:
        """Per name (only names with any), the versions operator rollbacks withdrew, ascending."""
        patches = self._state["patches"]
        return {n: sorted(set(patches[n]["withdrawn"].values())) for n in sorted(patches) if patches[n]["withdrawn"]}

    def check(self, name: str, version: int, digest: str) -> None:
        """Raise :class:`RollbackError` if ``name@version`` may not serve, by the last-read state."""
        _check(self._state, name, version, digest)

    def refresh(self) -> State:
        """Re-read the file (other replicas' changes). On failure keep the last good state, set
        :attr:`error` and raise :class:`StateError`."""
        if self._path is None:
            return self._state
        with self._lock:
            try:
                self._state = self._read()
            except StateError as exc:
                self.error = str(exc)
                raise
            self.error = None
            return self._state

    # -- writing ---------------------------------------------------------------------------------
    def _change(self, mutate: Callable[[State], None]) -> None:
        """Read the current file under the lock, apply ``mutate`` (which may raise to refuse), write.
        Memory changes only after the write succeeded."""
        with self._lock:
            if self._path is None:
                state = json.loads(json.dumps(self._state))
                mutate(state)
                state["serial"] += 1
                self._state = state
                return
            assert self._file_lock is not None
            try:
                with self._file_lock:
                    state = self._read()
                    mutate(state)
                    state["serial"] += 1
                    write_atomic(self._path, json.dumps(state, indent=2, sort_keys=True).encode())
            except Timeout as exc:
                raise StateError(f"version state {self._path} is locked by another writer for too long") from exc
            except OSError as exc:
                raise StateError(f"version state {self._path} cannot be written: {exc.strerror}") from exc
            self._state = state
            self.error = None

    def admit(self, name: str, version: int, digest: str, retire: Iterable[tuple[str, int, str]] = ()) -> None:
        """Check ``name@version`` against the current file and record it as accepted, retiring the
        versions it supersedes, in one write.

        Raises:
            RollbackError: Refused; nothing was written.
            StateError: The ledger could not be written; nothing changed.
        """
        retire = list(retire)

        def mutate(state: State) -> None:
            _check(state, name, version, digest)
            entry = _entry(state, name)
            entry["versions"][str(version)] = digest
            entry["retired"].pop(digest, None)
            for old_name, old_version, old_digest in retire:
                _entry(state, old_name)["retired"][old_digest] = old_version

        self._change(mutate)

    def retire(self, name: str, version: int, digest: str) -> None:
        """Record an unloaded version: below the floor it cannot come back."""
        self._change(lambda state: _entry(state, name)["retired"].__setitem__(digest, version))

    def roll_back(self, name: str, version: int) -> list[str]:
        """The operator's explicit rollback: withdraw every version above ``version``; returns their digests."""
        withdrawn: list[str] = []
        previous = self.floor(name)

        def mutate(state: State) -> None:
            entry = _entry(state, name)
            newer = {d: int(v) for v, d in entry["versions"].items() if int(v) > version}
            entry["withdrawn"].update(newer)
            withdrawn[:] = sorted(newer)

        self._change(mutate)
        log.warning("ROLLBACK by operator: patch %s floor lowered from %s to %s", name, previous, version)
        return withdrawn
