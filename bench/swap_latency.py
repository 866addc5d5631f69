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
from patches.format import write_atomic

ADMIN_TOKEN = "bench-admin-token-0123456789"
BODY = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1, "temperature": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_for(client: httpx.Client, version: int, started: float) -> float:
    deadline = started + 30
    while time.perf_counter() < deadline:
        response = client.post("/v1/chat/completions", json=BODY, headers={"X-Tenant-Id": "hot"})
        if response.headers.get("X-Patch-Applied") == f"hot@{version}":
            return time.perf_counter() - started
    raise TimeoutError(f"hot@{version} never went live")


def summary(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 0.99), "max_ms": max(ms)}


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
    admin, drop = [], []
    with running_server(env, root / "server.log") as url, httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(3):  # warm the engine and the patch's prefix cache
            client.post("/v1/chat/completions", json=BODY, headers={"X-Tenant-Id": "hot"})
        baseline = []  # one one-token request alone: the floor under both latencies
        for _ in range(20):
            started = time.perf_counter()
            client.post("/v1/chat/completions", json=BODY, headers={"X-Tenant-Id": "hot"})
            baseline.append(time.perf_counter() - started)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/octet-stream"}
        for i in range(args.swaps):
            version = 2 + i
            started = time.perf_counter()
            client.post("/admin/patches", content=payloads[i], headers=headers).raise_for_status()
            admin.append(wait_for(client, version, started))
        for i in range(args.swaps):
            version = 2 + args.swaps + i
            started = time.perf_counter()
            write_atomic(patch_dir / "hot.safetensors", payloads[args.swaps + i])
            drop.append(wait_for(client, version, started))
    result = {
        "one_token_request": summary(baseline),
        "admin_swap_to_first_response": summary(admin),
        "file_drop_to_first_response": summary(drop),
    }
    write_result("swap_latency", result)


if __name__ == "__main__":
    main()
