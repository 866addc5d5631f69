"""Choose the KV-cache block size: patched vs bare latency for several block sizes (same run, same prompts).

Prefix caching reuses whole blocks only, so a 50-row patch is computed once per tenant only where
its rows fill blocks; the rest is recomputed with every request. For each block size this starts
the real server (eager), warms it, then, for several workloads that share prefixes of different
lengths, sends the same sequential streaming requests to a bare and a patched tenant, alternating,
and reports TTFT and end-to-end latency ratios patched/bare (mean and worst over the workloads).

Run: ``python -m bench.block_size [--sizes 32 64 128] [--requests N]``. Writes
``$PATCHSERVE_BENCH_OUT/block_size.json``.
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

PROMPTS = [f"Write two sentences about the number {i} and why it is interesting." for i in range(64)]
# Workloads differ in the length of the prefix their requests share (a system prompt of 0 to ~130
# tokens): whether a patch costs prefill work depends on how its rows and that shared prefix fall
# on block boundaries, so a block size is judged by its mean over these alignments.
SYSTEM_PROMPTS = ["You are a helpful assistant. " * k for k in range(1, 25, 3)]


def timed_stream(client: httpx.Client, tenant: str, system: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    body = {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
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
    env = server_env(
        root,
        model_dir,
        state_dir=root / f"state{block_size}",
        allow_unsigned=1,
        dev_mode=1,
        watch="false",
        block_size=block_size,
    )
    per_workload = []
    with running_server(env, root / f"server{block_size}.log") as url, httpx.Client(base_url=url, timeout=120) as c:
        for tenant in ("bare", "patched"):
            timed_stream(c, tenant, SYSTEM_PROMPTS[0], PROMPTS[0], max_tokens)
        for system in SYSTEM_PROMPTS:
            samples: dict[str, list[tuple[float, float]]] = {"bare": [], "patched": []}
            for i in range(requests):
                for tenant, values in samples.items():
                    values.append(timed_stream(c, tenant, system, PROMPTS[i % len(PROMPTS)], max_tokens))
            per_workload.append(
                {
                    f"{tenant}_{metric}": statistics.median(v[k] for v in values) * 1000
                    for tenant, values in samples.items()
                    for k, metric in enumerate(("ttft_ms", "e2e_ms"))
                }
            )
    out = {key: statistics.mean(w[key] for w in per_workload) for key in per_workload[0]}
    ttft = [w["patched_ttft_ms"] / w["bare_ttft_ms"] for w in per_workload]
    e2e = [w["patched_e2e_ms"] / w["bare_e2e_ms"] for w in per_workload]
    out |= {
        "ttft_ratio_mean": statistics.mean(ttft),
        "ttft_ratio_max": max(ttft),
        "e2e_ratio_mean": statistics.mean(e2e),
        "e2e_ratio_max": max(e2e),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--requests", type=int, default=12, help="requests per tenant and workload")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    model_dir = prepare_default_model()
    root = Path(tempfile.mkdtemp(prefix="patchserve-blocks-"))
    tenants = [
        {"id": "bare", "allow_unpatched": True},
        {"id": "patched", "default_stack": ["p"], "allowed_patches": ["p"]},
    ]
    prepare_root(root, tenants)
    write_atomic(root / "patches" / "p.safetensors", text_patch(model_dir, "p", n_tokens=50))
    result = {size: measure(size, args.requests, args.max_tokens, root, model_dir) for size in args.sizes}
    write_result("block_size", result)


if __name__ == "__main__":
    main()
