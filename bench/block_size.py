"""Choose the KV-cache block size: patched vs bare latency for several block sizes (same run, same prompts).

Prefix caching reuses whole blocks only, so a 50-row patch is computed once per tenant only where
its rows fill blocks; the rest is recomputed with every request. For each block size this starts
the real server (eager), warms it, then sends the same sequential streaming requests to a bare and
a patched tenant, alternating, and reports TTFT and end-to-end latency ratios patched/bare.

Run: ``python -m bench.block_size [--sizes 32 64 128] [--requests N]``. Writes
``$PATCHSERVE_BENCH_OUT/block_size.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench.launch import running_server
from patches.basemodel import prepare_default_model
from patches.demo import text_patch
from patches.format import write_atomic

PROMPTS = [f"Write two sentences about the number {i} and why it is interesting." for i in range(64)]


def timed_stream(client: httpx.Client, tenant: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Tenant-Id": tenant}) as response:
        for line in response.iter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - started, end - started


def measure(block_size: int, requests: int, max_tokens: int, root: Path, model_dir: Path) -> dict[str, float]:
    env = {
        "PATCHSERVE_MODEL": str(model_dir),
        "PATCHSERVE_PATCH_DIR": str(root / "patches"),
        "PATCHSERVE_TENANTS_FILE": str(root / "tenants.yaml"),
        "PATCHSERVE_STATE_DIR": str(root / f"state{block_size}"),
        "PATCHSERVE_ALLOW_UNSIGNED": "1",
        "PATCHSERVE_DEV_MODE": "1",
        "PATCHSERVE_ENFORCE_EAGER": "true",
        "PATCHSERVE_BLOCK_SIZE": str(block_size),
        "PATCHSERVE_WATCH": "false",
    }
    samples: dict[str, list[tuple[float, float]]] = {"bare": [], "patched": []}
    with running_server(env, root / f"server{block_size}.log") as url, httpx.Client(base_url=url, timeout=120) as c:
        for tenant in samples:
            for prompt in PROMPTS[:4]:
                timed_stream(c, tenant, prompt, max_tokens)
        for i in range(requests):
            for tenant in samples:
                samples[tenant].append(timed_stream(c, tenant, PROMPTS[i % len(PROMPTS)], max_tokens))
    out = {}
    for tenant, values in samples.items():
        out[f"{tenant}_ttft_p50_ms"] = statistics.median(v[0] for v in values) * 1000
        out[f"{tenant}_e2e_p50_ms"] = statistics.median(v[1] for v in values) * 1000
    out["ttft_ratio"] = out["patched_ttft_p50_ms"] / out["bare_ttft_p50_ms"]
    out["e2e_ratio"] = out["patched_e2e_p50_ms"] / out["bare_e2e_p50_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    model_dir = prepare_default_model()
    root = Path(tempfile.mkdtemp(prefix="patchserve-blocks-"))
    write_atomic(root / "patches" / "p.safetensors", text_patch(model_dir, "p", n_tokens=50))
    tenants = {
        "tenants": [
            {"id": "bare", "allow_unpatched": True},
            {"id": "patched", "default_stack": ["p"], "allowed_patches": ["p"]},
        ]
    }
    (root / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    result = {size: measure(size, args.requests, args.max_tokens, root, model_dir) for size in args.sizes}
    out = Path(os.environ.get("PATCHSERVE_BENCH_OUT", "bench-results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "block_size.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))  # noqa: T201 - a benchmark's report


if __name__ == "__main__":
    main()
