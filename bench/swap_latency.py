"""Time from a patch swap to the first response served with the new version (p50, p99).

Two paths: an admin upload (``POST /admin/patches``), and a signed file landing in the watched
patch directory (written to a hidden temporary name, then renamed). After each swap the client
sends back-to-back one-token requests until ``X-Patch-Applied`` names the new version; the latency
is from the start of the swap to the end of that response.

Run: ``python -m bench.swap_latency [--swaps N]`` (``make bench-swap``). Writes
``$PATCHSERVE_BENCH_OUT/swap_latency.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.launch import prepare_root, running_server, server_env, write_result
from patches.basemodel import prepare_default_model
from patches.demo import text_patch
from patches.format import read_patch, write_atomic

ADMIN_TOKEN = "bench-admin-token-0123456789"
BODY = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1, "temperature": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_for(client: httpx.Client, version: int, started: float, tenant: str = "hot", patch: str = "hot") -> float:
    """Send one-token requests as ``tenant`` until ``patch@version`` answers; seconds since ``started``."""
    deadline = started + 30
    while time.perf_counter() < deadline:
        response = client.post("/v1/chat/completions", json=BODY, headers={"X-Tenant-Id": tenant})
        if response.headers.get("X-Patch-Applied") == f"{patch}@{version}":
            return time.perf_counter() - started
    raise TimeoutError(f"{patch}@{version} never went live")


def summary(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 0.99), "max_ms": max(ms)}


def measure(
    client: httpx.Client, patch_dir: Path, payloads: list[bytes], admin_token: str, tenant: str = "hot"
) -> dict[str, dict[str, float]]:
    """Swap latencies on a running server whose ``tenant`` has the patch of ``payloads`` as its default stack.

    ``payloads`` are signed files of that patch with consecutive versions, each above the live one: the
    first half is uploaded through the admin API, the second half dropped into ``patch_dir``.
    """
    meta = read_patch(payloads[0])[0]
    patch, first = meta.name, meta.version
    swaps = len(payloads) // 2
    for _ in range(3):  # warm the engine and the patch's prefix cache
        client.post("/v1/chat/completions", json=BODY, headers={"X-Tenant-Id": tenant})
    baseline = []  # one one-token request alone: the floor under both latencies
    for _ in range(20):
        started = time.perf_counter()
        client.post("/v1/chat/completions", json=BODY, headers={"X-Tenant-Id": tenant})
        baseline.append(time.perf_counter() - started)
    admin, drop = [], []
    headers = {"Authorization": f"Bearer {admin_token}", "content-type": "application/octet-stream"}
    for i in range(swaps):
        started = time.perf_counter()
        client.post("/admin/patches", content=payloads[i], headers=headers).raise_for_status()
        admin.append(wait_for(client, first + i, started, tenant, patch))
    for i in range(swaps, 2 * swaps):
        started = time.perf_counter()
        write_atomic(patch_dir / f"{patch}.safetensors", payloads[i])
        drop.append(wait_for(client, first + i, started, tenant, patch))
    return {
        "one_token_request": summary(baseline),
        "admin_swap_to_first_response": summary(admin),
        "file_drop_to_first_response": summary(drop),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=40, help="swaps per path")
    args = parser.parse_args()
    model_dir = prepare_default_model()
    root = Path(tempfile.mkdtemp(prefix="patchserve-swap-"))
    key = prepare_root(root, [{"id": "hot", "default_stack": ["hot"], "allowed_patches": ["hot"]}], signer="bench")
    patch_dir = root / "patches"
    write_atomic(patch_dir / "hot.safetensors", text_patch(model_dir, "hot", version=1, key=key))
    env = server_env(root, model_dir, admin_token=ADMIN_TOKEN)
    payloads = [
        text_patch(model_dir, "hot", version=v, noise=0.01, seed=v, key=key) for v in range(2, 2 * args.swaps + 2)
    ]
    with running_server(env, root / "server.log") as url, httpx.Client(base_url=url, timeout=60) as client:
        result = measure(client, patch_dir, payloads, ADMIN_TOKEN)
    write_result("swap_latency", result)


if __name__ == "__main__":
    main()
