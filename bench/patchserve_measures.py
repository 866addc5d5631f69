"""The overhead benchmark's patchserve-only measurements, each on a running bench server.

Resident memory per loaded patch (:func:`memory_per_patch`), cold vs warm prefix cache for a patch
(:func:`cold_vs_warm`), 1/100/1,000 tenants with distinct stacks at once (:func:`many_tenants`), and
swap latency of the ``hot`` patch (:func:`swap_times`, via :mod:`bench.swap_latency`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench import swap_latency
from bench.loadgen import Call, run_segment
from bench.segments import Matrix, busy_note, log, rotated
from bench.stats import Segment, point_figures
from bench.variants import ADMIN_TOKEN, patchserve_call
from bench.workload import Options, PromptBook, request_count
from patches.demo import text_patch
from patches.format import read_patch, write_atomic


def rss(process: psutil.Process) -> tuple[int, int]:
    """Resident bytes of the server process, and of it plus its children (vLLM's engine core)."""
    own = process.memory_info().rss
    return own, own + sum(c.memory_info().rss for c in process.children(recursive=True))


def cold_vs_warm(url: str, book: PromptBook, opts: Options) -> dict[str, object]:
    """Sequential requests: a tenant's first (its patch rows not cached), its second (cached), and bare."""
    calls: dict[str, list[Call]] = {"cold": [], "warm": [], "bare": []}
    prompts = book.get(("cold",), 3 * opts.cold_pairs)
    for k in range(opts.cold_pairs):
        tenant = f"cold-{k:04d}"
        calls["cold"].append(patchserve_call("patch", prompts[3 * k], opts.max_tokens, tenant))
        calls["warm"].append(patchserve_call("patch", prompts[3 * k + 1], opts.max_tokens, tenant))
        calls["bare"].append(patchserve_call("bare", prompts[3 * k + 2], opts.max_tokens))
    samples: dict[str, list] = defaultdict(list)
    for k in range(opts.cold_pairs):
        for kind in ("cold", "warm", "bare"):
            samples[kind] += run_segment(url, [calls[kind][k]], 1).samples
    figures = {kind: point_figures([Segment(s, sum(x.e2e for x in s))]) for kind, s in samples.items()}
    return {
        kind: {k: figures[kind][k] for k in ("requests", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms")}
        for kind in figures
    } | {
        "cold_over_warm_ttft_p50": figures["cold"]["ttft_p50_ms"] / figures["warm"]["ttft_p50_ms"],
        "warm_over_bare_ttft_p50": figures["warm"]["ttft_p50_ms"] / figures["bare"]["ttft_p50_ms"],
    }


def many_tenants(url: str, book: PromptBook, plans: dict[int, tuple[int, int]], opts: Options) -> dict[str, object]:
    """1, 100, 1,000 tenants with distinct stacks (each its own cache salt) at once, vs bare, interleaved."""
    top = max(opts.tenant_counts)
    c = opts.tenant_concurrency
    prompts = book.get(("tenant-warm",), top)
    warm = run_segment(url, [patchserve_call("patch", p, 1, f"t-{k:04d}") for k, p in enumerate(prompts)], 16)
    log(f"  warmed {top} tenants in {warm.wall:.1f}s")
    n = plans[c][1] if c in plans else request_count(1.0, c, opts)
    matrix = Matrix()
    offset = 0
    names = ["bare", *(f"tenants_{k}" for k in opts.tenant_counts)]
    for r in range(max(2, opts.repeats - 1)):
        for name in rotated(names, r):

            def calls(attempt: int, name: str = name, r: int = r, offset: int = offset) -> list[Call]:
                # Fresh prompts per name: one prompt sent to the same tenant twice would be a full cache hit.
                ps = book.get(("tenants", name, r, attempt), n)
                if name == "bare":
                    return [patchserve_call("bare", p, opts.max_tokens) for p in ps]
                k = int(name.split("_")[1])
                return [
                    patchserve_call("patch", p, opts.max_tokens, f"t-{(offset + i) % k:04d}") for i, p in enumerate(ps)
                ]

            segment = matrix.run(url, name, c, calls)
            log(f"  c={c} rep {r} {name:<15} {segment.tokens / segment.wall:7.1f} tok/s{busy_note(segment)}")
        offset += n
    figures = matrix.figures()
    bare = figures["bare"][c]
    out: dict[str, object] = {"concurrency": c, "requests_per_segment": n, "warm_up_s": warm.wall}
    out["foreign_cpu"] = matrix.foreign_cpu()
    for name in names:
        f = figures[name][c]
        out[name] = {
            "throughput_tok_s": f["throughput_tok_s"],
            "ttft_p50_ms": f["ttft_p50_ms"],
            "e2e_p50_ms": f["e2e_p50_ms"],
            "throughput_ratio": f["throughput_tok_s"] / bare["throughput_tok_s"],
            "ttft_p50_ratio": f["ttft_p50_ms"] / bare["ttft_p50_ms"],
            "prefix_cache_hit_rate": matrix.hit_rates().get(name),
        }
    return out


def memory_per_patch(
    url: str, process: psutil.Process, patch_dir: Path, model_dir: Path, key: Ed25519PrivateKey, n: int
) -> dict[str, object]:
    """Server RSS with ``n`` more (signed, distinct) patches loaded, per patch."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def loaded() -> int:
        return len(httpx.get(f"{url}/admin/patches", headers=headers, timeout=30).json()["patches"])

    payloads = [text_patch(model_dir, f"mem-{i:04d}", noise=0.01, seed=i, key=key) for i in range(n)]
    base_count = loaded()
    time.sleep(2)
    before, before_tree = rss(process)
    for i, data in enumerate(payloads):
        write_atomic(patch_dir / f"mem-{i:04d}.safetensors", data)
    deadline = time.monotonic() + 300
    while loaded() < base_count + n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {loaded() - base_count} of {n} patches loaded")
        time.sleep(0.5)
    time.sleep(2)
    after, after_tree = rss(process)
    _, rows, _ = read_patch(payloads[0])
    return {
        "patches": n,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "rss_per_patch_kb": (after - before) / n / 1024,
        "rss_tree_per_patch_kb": (after_tree - before_tree) / n / 1024,
        "file_kb": len(payloads[0]) / 1024,
        "rows": list(rows.shape),
        "file_dtype": str(rows.dtype).removeprefix("torch."),
        "rows_bf16_kb": rows.numel() * 2 / 1024,
    }


def swap_times(
    url: str, patch_dir: Path, model_dir: Path, key: Ed25519PrivateKey, opts: Options
) -> dict[str, dict[str, float]]:
    """Swap latency of the ``hot`` patch (admin upload and file drop) over ``opts.swaps`` new versions per path."""
    payloads = [
        text_patch(model_dir, "hot", version=v, noise=0.01, seed=v, key=key) for v in range(2, 2 * opts.swaps + 2)
    ]
    with httpx.Client(base_url=url, timeout=60) as client:
        return swap_latency.measure(client, patch_dir, payloads, ADMIN_TOKEN)
