"""Soak: 16 streams on the real engine while the control plane is churned with swaps, operator rollbacks
and tenant-file reloads.

Every response must be complete (``[DONE]``, no error frame, ``finish_reason`` length) and its
``X-Patch-Applied`` must name a version that was live at some moment between sending the request and
its admission (the response headers). ``make soak`` runs the issue's full soak (10 minutes, 200
operations); the suite runs the same code for ``SOAK_SECONDS`` (default 45 s) with ``SOAK_OPS`` (30).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import httpx
import pytest
import yaml

from tests.integration.conftest import ADMIN_TOKEN, TENANTS, RunningServer
from tests.integration.test_hot_swap import CLIENTS, Result, signed_version, stream_once

pytestmark = pytest.mark.engine

SECONDS = float(os.environ.get("SOAK_SECONDS", "45"))
OPS = int(os.environ.get("SOAK_OPS", "30"))
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Timeline:
    """When each version of ``hot`` was live: intervals [start, end], end None while it still is."""

    live: dict[int, list[list[float | None]]] = field(default_factory=dict)
    current: int = 0

    def switch(self, to: int, started: float, finished: float) -> None:
        """``to`` is live from ``started`` (the request that makes it live was sent); the previous version
        stops being live by ``finished`` (that request's answer came back)."""
        self.live.setdefault(to, []).append([started, None])
        for interval in self.live.get(self.current, []):
            if interval[1] is None and self.current != to:
                interval[1] = finished
        self.current = to

    def was_live(self, version: int, sent: float, admitted_by: float) -> bool:
        return any(
            start <= admitted_by and (end is None or end >= sent)  # type: ignore[operator]
            for start, end in self.live.get(version, [])
        )


async def _loaded_versions(client: httpx.AsyncClient) -> tuple[list[int], int]:
    listing = (await client.get("/admin/patches", headers=ADMIN)).json()
    versions = sorted(p["version"] for p in listing["patches"] if p["name"] == "hot")
    return versions, listing["version_floors"].get("hot", max(versions))


def _tenants_file(server: RunningServer, extra: int | None) -> None:
    tenants = list(TENANTS["tenants"])
    if extra is not None:  # a change the reload must apply: one more tenant
        tenants.append({"id": f"soak-{extra}", "default_stack": ["hot"], "allowed_patches": ["hot"]})
    path = server.root / "tenants.yaml"
    tmp = path.with_name(".tenants.yaml.tmp")
    tmp.write_text(yaml.safe_dump({"tenants": tenants}))
    tmp.replace(path)  # an operator's atomic swap


async def test_streams_survive_swaps_rollbacks_and_tenant_reloads(server: RunningServer) -> None:
    results: list[Result] = []
    errors: list[str] = []
    counts = {"swap": 0, "rollback": 0, "reload": 0}
    done = asyncio.Event()

    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        versions, floor = await _loaded_versions(client)
        timeline = Timeline()
        timeline.switch(versions[-1], 0.0, 0.0)
        next_version = floor + 1
        payloads = {v: signed_version(server, v) for v in range(next_version, next_version + OPS)}

        async def streamer(i: int) -> None:
            while not done.is_set():
                try:
                    results.append(await stream_once(client, i))
                except (AssertionError, httpx.HTTPError) as exc:
                    errors.append(f"client {i}: {type(exc).__name__}: {exc}")

        async def operator() -> None:
            nonlocal next_version
            await asyncio.sleep(1.0)
            pause = SECONDS / OPS
            for op in range(OPS):
                started = time.monotonic()
                loaded = (await _loaded_versions(client))[0]
                if op % 5 == 4 and len(loaded) > 1:
                    # explicit rollback: the newest version is withdrawn, the one before serves again
                    target = loaded[-2]
                    response = await client.post("/admin/patches/hot/rollback", json={"version": target}, headers=ADMIN)
                    assert response.status_code == 200, response.text
                    timeline.switch(target, started, time.monotonic())
                    counts["rollback"] += 1
                elif op % 3 == 2:
                    _tenants_file(server, op if op % 2 else None)
                    response = await client.post("/admin/tenants/reload", headers=ADMIN)
                    assert response.status_code == 200, response.text
                    counts["reload"] += 1
                else:
                    data = payloads[next_version]
                    headers = {**ADMIN, "content-type": "application/octet-stream"}
                    response = await client.post("/admin/patches", content=data, headers=headers)
                    assert response.status_code == 201, response.text
                    timeline.switch(next_version, started, time.monotonic())
                    next_version += 1
                    counts["swap"] += 1
                await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))
            last = time.monotonic()
            deadline = last + 120  # until a stream sent after the last operation has finished
            while not any(r.sent > last for r in results) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            done.set()

        try:
            await asyncio.gather(operator(), *(streamer(i) for i in range(CLIENTS)))
        finally:
            done.set()
            _tenants_file(server, None)
            await client.post("/admin/tenants/reload", headers=ADMIN)
        readyz = await client.get("/readyz")

    assert not errors, errors[:5]
    assert counts["swap"] and counts["rollback"] and counts["reload"], counts
    assert len(results) >= CLIENTS * 3
    assert all(r.frames_ok for r in results), "a stream failed or was truncated"
    assert all(r.finish_reason == "length" for r in results)
    stale = [r for r in results if not timeline.was_live(r.version, r.sent, r.admitted_by)]
    assert not stale, stale[:5]
    assert len({r.version for r in results}) >= 3
    assert readyz.status_code == 200, readyz.text
