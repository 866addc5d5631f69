"""Does the server's own overhead metric agree with the benchmark's measured overhead?

Two runs of one workload on the real server (one engine at a time), per concurrency:

1. **benchmark** — overhead sampling off; interleaved segments of the bare tenant and of the tenant
   with the shipped 50-token patch (fresh prompts per segment, the same prompts for both variants),
   streamed, greedy, fixed ``max_tokens``, EOS ignored. Overhead = mean e2e (TTFT) patched / bare − 1.
2. **metric** — a fresh server with ``PATCHSERVE_OVERHEAD_SAMPLE_RATE=1`` (one replay pair at a time)
   serving the same kind of traffic; overhead read from its ``/metrics`` counters:
   ``sum(patched seconds) / sum(baseline seconds) − 1`` over every replay pair.

Run: ``python -m bench.overhead_agreement`` (``make bench-agreement``). Writes
``$PATCHSERVE_BENCH_OUT/overhead_agreement.json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.launch import prepare_root, running_server, server_env, write_result
from bench.loadgen import Call, run_segment
from bench.stats import Segment
from bench.variants import DEMO_TRUST, PREFIX_PATCH, messages, sampling
from bench.workload import user_prompt
from patches.basemodel import prepare_default_model

TENANTS = [
    {"id": "bare", "default_stack": [], "allowed_patches": []},
    {"id": "patched", "default_stack": ["refusal"], "allowed_patches": ["refusal"]},
]


def _call(tenant: str, prompt: str, max_tokens: int) -> Call:
    return Call(
        "/v1/chat/completions",
        {"messages": messages(prompt), **sampling(max_tokens)},
        {"X-Tenant-Id": tenant},
    )


def _mean(segments: list[Segment], phase: str) -> float:
    return statistics.fmean(getattr(s, phase) for seg in segments for s in seg.samples)


def _counters(url: str) -> dict[str, float]:
    """Summed overhead counters of the ``patched`` tenant, by ``<kind>_<phase>``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.labels.get("tenant") != "patched":
                continue
            if s.name == "patchserve_overhead_samples_total":
                out["samples"] = s.value
            for kind in ("patched", "baseline"):
                if s.name == f"patchserve_overhead_{kind}_seconds_total":
                    out[f"{kind}_{s.labels['phase']}"] = s.value
    return out


def _server(root: Path, model_dir: Path, rate: float, eager: bool) -> dict[str, str]:
    prepare_root(root, TENANTS, trust_from=DEMO_TRUST)
    shutil.copy(PREFIX_PATCH, root / "patches" / PREFIX_PATCH.name)
    return server_env(root, model_dir, overhead_sample_rate=rate, enforce_eager=str(eager).lower(), log_level="warning")


def measure(concurrency: int, repeats: int, per_segment: int, max_tokens: int, eager: bool) -> dict[str, object]:
    model_dir = prepare_default_model()
    uid = iter(range(10**9))
    with tempfile.TemporaryDirectory() as tmp:
        env = _server(Path(tmp) / "bench", model_dir, 0.0, eager)
        with running_server(env, Path(tmp) / "bench.log") as url:
            for tenant in ("bare", "patched"):  # warm: the patch rows and the chat template in the cache
                run_segment(url, [_call(tenant, user_prompt(next(uid)), max_tokens) for _ in range(4)], 1)
            runs: dict[str, list[Segment]] = {"bare": [], "patched": []}
            for r in range(repeats):
                prompts = [user_prompt(next(uid)) for _ in range(per_segment)]
                for tenant in ("bare", "patched") if r % 2 == 0 else ("patched", "bare"):
                    calls = [_call(tenant, p, max_tokens) for p in prompts]
                    runs[tenant].append(run_segment(url, calls, concurrency))
        bench = {phase: _mean(runs["patched"], phase) / _mean(runs["bare"], phase) - 1 for phase in ("ttft", "e2e")}

        env = _server(Path(tmp) / "metric", model_dir, 1.0, eager)
        with running_server(env, Path(tmp) / "metric.log") as url:
            for r in range(repeats):
                prompts = [user_prompt(next(uid)) for _ in range(per_segment)]
                for tenant in ("bare", "patched") if r % 2 == 0 else ("patched", "bare"):
                    run_segment(url, [_call(tenant, p, max_tokens) for p in prompts], concurrency)
            counters = _counters(url)
    metric = {phase: counters[f"patched_{phase}"] / counters[f"baseline_{phase}"] - 1 for phase in ("ttft", "e2e")}
    return {
        "concurrency": concurrency,
        "requests_per_variant": repeats * per_segment,
        "max_tokens": max_tokens,
        "replay_pairs": counters.get("samples", 0),
        "benchmark_overhead": bench,
        "metric_overhead": metric,
        "difference_pp": {phase: 100 * (metric[phase] - bench[phase]) for phase in ("ttft", "e2e")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--per-segment", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--compiled", action="store_true", help="compiled engine (default: eager)")
    args = parser.parse_args()
    results = [
        measure(c, args.repeats, max(args.per_segment, c), args.max_tokens, eager=not args.compiled)
        for c in args.concurrency
    ]
    write_result("overhead_agreement", {"engine": "compiled" if args.compiled else "eager", "points": results})


if __name__ == "__main__":
    main()
