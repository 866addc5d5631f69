"""Two replicas sharing one patch directory converge on every swap, agree on rollbacks across
restarts in either order, and SIGTERM drains a stream and exits 0.

The session server is replica A; this module starts replica B on the same patch directory, trust
store, tenant file and version ledger (state dir), like two pods on one RWX volume.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bench.launch import running_server_process, server_env
from patches.format import content_digest, read_patch
from tests.integration.conftest import ADMIN_TOKEN, RunningServer
from tests.support import write_patch

pytestmark = pytest.mark.engine

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


SYNC_SECONDS = 1.0  # replica B's ledger poll; a rollback reaches it within this plus one sync
PROPAGATION_BOUND_S = 10 * SYNC_SECONDS  # generous for a loaded CI machine; the bound stated in the README


@dataclass
class Replica:
    """Replica B: a real server process that can be stopped and started again on the same files."""

    env: dict[str, str]
    log: Path
    stack: ExitStack = field(default_factory=ExitStack)
    url: str = ""
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.url, self.process = self.stack.enter_context(running_server_process(self.env, self.log))

    def stop(self) -> None:
        self.stack.close()
        self.stack = ExitStack()


@pytest.fixture(scope="module")
def replica(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    root = tmp_path_factory.mktemp("replica-b")
    env = server_env(
        root,
        server.model_dir,
        patch_dir=server.patch_dir,
        tenants_file=server.root / "tenants.yaml",
        trust_dir=server.root / "trust",
        state_dir=server.root / "state",
        state_sync_seconds=SYNC_SECONDS,
        admin_token=ADMIN_TOKEN,
        dtype="float32",
        gpu_memory_utilization=0.2,
        max_model_len=1024,
        max_num_seqs=8,
        drain_timeout=30,
        overhead_sample_rate=0,
    )
    running = Replica(env, root / "server.log")
    running.start()
    yield running
    running.stop()


def _live(url: str, name: str) -> dict[int, str]:
    """``version`` → sha256 of ``name`` as the replica's admin listing shows it."""
    listing = httpx.get(f"{url}/admin/patches", headers=ADMIN, timeout=10).json()
    return {p["version"]: p["sha256"] for p in listing["patches"] if p["name"] == name}


def _applied(url: str, stack: str) -> str:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        headers={"X-Tenant-Id": "replica", "X-Patch-Stack": stack},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.headers["X-Patch-Applied"]


def _converged(urls: list[str], name: str, version: int, digest: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = [_live(url, name) for url in urls]
        if all(view.get(version) == digest for view in views):
            return
        time.sleep(0.2)
    raise AssertionError(f"replicas did not converge on {name}@{version} {digest}: {views}")


def test_replicas_sharing_a_patch_directory_converge_on_each_swap(server: RunningServer, replica: Replica) -> None:
    urls = [server.url, replica.url]
    for version in (1, 2):
        path = write_patch(
            server.model_dir, server.patch_dir, "shared", version=version, n_tokens=16, noise=0.01, key=server.key
        )
        _, tensor, header = read_patch(path.read_bytes())
        digest = content_digest(header, tensor)
        _converged(urls, "shared", version, digest)
        # and both serve it: the newest version answers an unpinned reference on each replica
        assert [_applied(url, "shared") for url in urls] == [f"shared@{version}"] * 2


def _publish(server: RunningServer, version: int) -> str:
    path = write_patch(server.model_dir, server.patch_dir, "shared", version=version, n_tokens=16, key=server.key)
    _, tensor, header = read_patch(path.read_bytes())
    return content_digest(header, tensor)


def _refused(url: str, source: str) -> str | None:
    listing = httpx.get(f"{url}/admin/patches", headers=ADMIN, timeout=10).json()
    return next((r["reason"] for r in listing["rejections"] if r["source"] == source), None)


def _rolled_back(url: str, version: int) -> None:
    response = httpx.post(f"{url}/admin/patches/shared/rollback", json={"version": version}, headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text


def _withdrawn_everywhere(urls: list[str], version: int, timeout: float) -> float:
    """Seconds until every replica has unloaded ``shared@version`` and serves an older one."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if all(version not in _live(url, "shared") for url in urls):
            assert all(int(_applied(url, "shared").split("@")[1]) < version for url in urls)
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"shared@{version} still live after {timeout}s: {[_live(u, 'shared') for u in urls]}")


def test_a_rollback_reaches_every_replica_and_survives_restarts_in_either_order(
    server: RunningServer, replica: Replica
) -> None:
    urls = [server.url, replica.url]
    # 1. issued on B, propagated to A through the shared ledger; B (the issuer) restarts
    _converged(urls, "shared", 3, _publish(server, 3))
    _rolled_back(replica.url, 2)
    seconds = _withdrawn_everywhere(urls, 3, PROPAGATION_BOUND_S)
    logging.getLogger(__name__).info("rollback propagated to every replica in %.2fs", seconds)
    v3 = (server.patch_dir / "shared-v3.safetensors").read_bytes()
    again = httpx.post(f"{server.url}/admin/patches", content=v3, headers=ADMIN, timeout=30)
    assert again.status_code == 400 and again.json()["error"]["param"] == "rollback"
    replica.stop()
    replica.start()
    assert 3 not in _live(replica.url, "shared") and _refused(replica.url, "shared-v3.safetensors") == "rollback"
    # 2. issued on A while B is down; B starts afterwards and must not serve the withdrawn version
    _converged([server.url, replica.url], "shared", 4, _publish(server, 4))
    replica.stop()
    _rolled_back(server.url, 2)
    replica.start()
    urls = [server.url, replica.url]
    _withdrawn_everywhere(urls, 4, PROPAGATION_BOUND_S)
    assert _refused(replica.url, "shared-v4.safetensors") == "rollback"
    assert [_applied(url, "shared") for url in urls] == ["shared@2"] * 2


def test_sigterm_finishes_the_stream_in_flight_then_exits_zero(replica: Replica) -> None:
    url, process = replica.url, replica.process
    assert process is not None
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 120,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    frames: list[str] = []
    refused_new = False
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"X-Tenant-Id": "bare"}) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                frames.append(line.removeprefix("data: "))
                if len(frames) >= 3:
                    break
        process.send_signal(signal.SIGTERM)
        for line in lines:
            if line.startswith("data: "):
                frames.append(line.removeprefix("data: "))
            if not refused_new:
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                except httpx.TransportError:
                    refused_new = True  # the listener closed: no new requests are admitted
    assert frames[-1] == "[DONE]"
    usage = json.loads(frames[-2])["usage"]
    assert usage["completion_tokens"] == 120, usage
    assert process.wait(timeout=60) == 0
    assert refused_new, "the server kept accepting connections while draining"
