"""Two replicas sharing one patch directory converge on every swap; SIGTERM drains a stream and exits 0.

The session server is replica A; this module starts replica B on the same patch directory, trust
store and tenant file (its own rollback state, as each pod has), like two pods on one RWX volume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from bench.launch import running_server_process, server_env
from patches.format import content_digest, read_patch
from tests.integration.conftest import ADMIN_TOKEN, RunningServer
from tests.support import write_patch

pytestmark = pytest.mark.engine

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def replica(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    root = tmp_path_factory.mktemp("replica-b")
    env = server_env(
        root,
        server.model_dir,
        patch_dir=server.patch_dir,
        tenants_file=server.root / "tenants.yaml",
        trust_dir=server.root / "trust",
        admin_token=ADMIN_TOKEN,
        dtype="float32",
        gpu_memory_utilization=0.2,
        max_model_len=1024,
        max_num_seqs=8,
        drain_timeout=30,
        overhead_sample_rate=0,
    )
    with running_server_process(env, root / "server.log") as running:
        yield running


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


def test_replicas_sharing_a_patch_directory_converge_on_each_swap(
    server: RunningServer, replica: tuple[str, subprocess.Popen]
) -> None:
    urls = [server.url, replica[0]]
    for version in (1, 2):
        path = write_patch(
            server.model_dir, server.patch_dir, "shared", version=version, n_tokens=16, noise=0.01, key=server.key
        )
        _, tensor, header = read_patch(path.read_bytes())
        digest = content_digest(header, tensor)
        _converged(urls, "shared", version, digest)
        # and both serve it: the newest version answers an unpinned reference on each replica
        assert [_applied(url, "shared") for url in urls] == [f"shared@{version}"] * 2


def test_sigterm_finishes_the_stream_in_flight_then_exits_zero(replica: tuple[str, subprocess.Popen]) -> None:
    url, process = replica
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
