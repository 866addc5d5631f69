"""The shared version ledger: replicas on one file neither lose nor disagree about floors and withdrawals."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import pytest

from patches import rollback
from patches.errors import RollbackError, StateError
from patches.rollback import VersionLedger

A, B, C = ("sha256:" + c * 64 for c in "abc")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "versions.json"


def test_a_rollback_on_one_replica_survives_another_replicas_write(path: Path) -> None:
    one, two = VersionLedger(path), VersionLedger(path)  # two pods, one volume
    one.admit("refusal", 1, A)
    one.admit("refusal", 2, B)
    two.refresh()
    assert one.roll_back("refusal", 1) == [B]
    two.admit("detox", 1, C)  # written from two's memory before it refreshed: must not erase the rollback
    three = VersionLedger(path)  # a restart, in any order
    assert three.floor("refusal") == 1 and B in three.withdrawn()
    with pytest.raises(RollbackError, match="withdrawn"):
        two.admit("refusal", 2, B)
    two.refresh()
    assert B in two.withdrawn()


def test_a_version_never_changes_content_even_after_it_was_retired_or_withdrawn(path: Path) -> None:
    ledger = VersionLedger(path)
    ledger.admit("refusal", 6, A)
    ledger.retire("refusal", 6, A)  # deleted
    with pytest.raises(RollbackError, match="other content"):
        ledger.admit("refusal", 6, B)
    ledger.admit("refusal", 6, A)  # the same content may come back at the top
    with pytest.raises(RollbackError, match="older than"):
        ledger.admit("refusal", 5, C)  # below the floor and never accepted
    assert ledger.floor("refusal") == 6


def test_below_the_floor_only_the_same_live_content(path: Path) -> None:
    ledger = VersionLedger(path)
    ledger.admit("refusal", 1, A)
    ledger.admit("refusal", 3, B)
    ledger.admit("refusal", 1, A)  # the pinned older version, re-read after a restart
    with pytest.raises(RollbackError, match="older than"):
        ledger.admit("refusal", 2, C)
    ledger.retire("refusal", 1, A)
    with pytest.raises(RollbackError, match="older than"):
        ledger.admit("refusal", 1, A)


def test_after_a_rollback_the_fix_is_a_new_version(path: Path) -> None:
    ledger = VersionLedger(path)
    ledger.admit("refusal", 1, A)
    ledger.admit("refusal", 2, B)
    ledger.roll_back("refusal", 1)
    assert ledger.floor("refusal") == 1
    with pytest.raises(RollbackError, match="other content"):
        ledger.admit("refusal", 2, C)
    ledger.admit("refusal", 3, C)
    assert ledger.floor("refusal") == 3


def test_a_failed_write_moves_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = VersionLedger(path)
    ledger.admit("refusal", 1, A)
    before = path.read_bytes()

    def full_disk(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rollback, "write_atomic", full_disk)
    with pytest.raises(StateError, match="No space left"):
        ledger.admit("refusal", 2, B)
    assert ledger.floor("refusal") == 1 and path.read_bytes() == before
    monkeypatch.undo()
    ledger.admit("refusal", 2, B)
    assert VersionLedger(path).floor("refusal") == 2


@pytest.mark.parametrize("content", [b"", b"{}", b"{not json", b'{"format": 9, "serial": 0, "patches": {}}', b"\xff"])
def test_a_corrupt_or_empty_state_file_is_refused_never_reset(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(StateError, match="refusing|unknown format|not valid"):
        VersionLedger(path)


def test_refresh_of_a_corrupted_file_keeps_the_last_good_state_and_reports_it(path: Path) -> None:
    ledger = VersionLedger(path)
    ledger.admit("refusal", 2, A)
    path.write_text("{}")
    with pytest.raises(StateError):
        ledger.refresh()
    assert ledger.floor("refusal") == 2 and ledger.error is not None
    with pytest.raises(StateError):
        ledger.admit("refusal", 3, B)  # no write may start from an unreadable file


def test_format_1_files_are_migrated(path: Path) -> None:
    path.parent.mkdir(parents=True)
    old = {"patches": {"refusal": {"floor": 3, "live": {"3": B}, "retired": {"2": A}, "withdrawn": [C]}}}
    path.write_text(json.dumps(old))
    ledger = VersionLedger(path)
    assert ledger.floor("refusal") == 3 and ledger.withdrawn() == set()
    with pytest.raises(RollbackError):
        ledger.admit("refusal", 2, A)  # retired
    ledger.admit("refusal", 3, B)


def test_concurrent_writers_on_two_replicas_lose_nothing(path: Path) -> None:
    replicas = [VersionLedger(path), VersionLedger(path)]

    def publish(k: int) -> None:
        for v in range(1, 21):
            replicas[k].admit(f"patch{k}", v, "sha256:" + f"{k}{v:02d}".ljust(64, "0"))

    threads = [threading.Thread(target=publish, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = VersionLedger(path)
    assert final.floor("patch0") == 20 and final.floor("patch1") == 20 and final.serial == 40
