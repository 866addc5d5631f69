"""A client that goes away cancels its non-streaming generation."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import APIError
from server.routes import unless_disconnected


class _Request:
    def __init__(self, disconnect_after: float | None) -> None:
        self.delay = disconnect_after

    async def receive(self) -> dict[str, str]:
        if self.delay is None:
            await asyncio.Event().wait()  # never disconnects
        await asyncio.sleep(self.delay or 0)
        return {"type": "http.disconnect"}


async def test_disconnect_cancels_the_work() -> None:
    cancelled = asyncio.Event()

    async def generate() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "done"

    with pytest.raises(APIError) as info:
        await unless_disconnected(_Request(0.01), generate())  # type: ignore[arg-type]
    assert info.value.status == 499
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_finished_work_is_returned() -> None:
    async def generate() -> str:
        return "done"

    assert await unless_disconnected(_Request(None), generate()) == "done"  # type: ignore[arg-type]
