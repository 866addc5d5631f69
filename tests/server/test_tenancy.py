"""TenantResolver's layout cache under concurrent resolve() calls (request threads + the watcher's)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest
import torch

import server.tenancy as tenancy
from server.tenancy import TenantResolver


class _Layout:
    def to(self, dtype: torch.dtype) -> _Layout:
        return self


def _resolver() -> TenantResolver:
    return TenantResolver(cast(Any, None), cast(Any, None), separator_id=0, dtype=torch.float32)


def test_one_layout_per_stack_when_two_threads_compose_it_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    both_composing = threading.Barrier(2, timeout=10)  # breaks (fails the test) if composing held the lock

    def compose(patches: object, *, separator_id: int) -> _Layout:
        both_composing.wait()
        return _Layout()

    monkeypatch.setattr(tenancy, "compose_stack", compose)
    resolver = _resolver()
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: resolver._layout([], ("d1",)), range(2)))
    assert got[0] is got[1]
    assert list(resolver._layouts) == [("d1",)]
