"""Measured segments of the overhead benchmark: interleaving, disturbance re-runs, vLLM's engine counters.

:class:`Matrix` runs a segment (a closed-loop batch of calls, :func:`bench.loadgen.run_segment`) while
watching how much CPU other processes took, re-runs it on fresh prompts when the machine was busy,
and accumulates the engine statistics (vLLM's ``/metrics``) each variant moved. :func:`interleaved`
runs the main table's points with the variants in rotating order; :func:`warm_up` and
:func:`calibrate` prepare a server for them. :func:`log` prints the benchmark's progress.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable

import httpx
import psutil

from bench.loadgen import Call, run_segment
from bench.stats import Segment, point_figures
from bench.workload import Options, PromptBook, point_plan

FOREIGN_CPU_FLAG = 0.10  # segments during which other processes took more of the CPU are run again
RETRIES = 2  # at most this many re-runs of a disturbed segment (then it is kept, and flagged in the report)


def rotated(items: tuple[str, ...] | list[str], k: int) -> list[str]:
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: T201 - progress of a benchmark


ENGINE_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens")
ENGINE_HISTOGRAMS = (
    "e2e_request_latency_seconds",
    "time_to_first_token_seconds",
    "request_queue_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_prefill_kv_computed_tokens",
)


def scrape_engine(url: str) -> dict[str, float]:
    """vLLM's own counters and histogram sums/counts from ``/metrics`` (summed over labels); empty when absent."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    wanted = {f"vllm:{n}_total": n for n in ENGINE_COUNTERS}
    wanted |= {f"vllm:{n}_{part}": f"{n}_{part}" for n in ENGINE_HISTOGRAMS for part in ("sum", "count")}
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return dict(out)


def engine_breakdown(stats: dict[str, float], client_e2e_ms: float) -> dict[str, float]:
    """Where a variant's time went, per request, by vLLM's own clocks (means), and what the server and
    HTTP added on top (client end-to-end minus the engine's)."""
    n = stats.get("e2e_request_latency_seconds_count")
    if not n:
        return {}
    per = {
        f"engine_{key}_ms": stats.get(f"{name}_sum", 0.0) / n * 1000
        for key, name in (
            ("e2e", "e2e_request_latency_seconds"),
            ("ttft", "time_to_first_token_seconds"),
            ("queue", "request_queue_time_seconds"),
            ("prefill", "request_prefill_time_seconds"),
            ("decode", "request_decode_time_seconds"),
        )
    }
    per["prefill_computed_tokens"] = stats.get("request_prefill_kv_computed_tokens_sum", 0.0) / n
    per["prompt_tokens"] = stats.get("prompt_tokens", 0.0) / n
    queries = stats.get("prefix_cache_queries")
    per["prefix_cache_hit_rate"] = stats.get("prefix_cache_hits", 0.0) / queries if queries else math.nan
    per["client_e2e_ms"] = client_e2e_ms
    per["outside_engine_ms"] = client_e2e_ms - per["engine_e2e_ms"]
    return per


def _busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and every process it started (servers, engine cores, workers)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def wait_quiet(limit_s: float = 600) -> float:
    """Wait until other processes use under 10% of the CPU over 3 s (at most ``limit_s``); seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        busy, own = _busy_cpu_seconds(), _own_cpu_seconds()
        time.sleep(3)
        foreign = (_busy_cpu_seconds() - busy) - (_own_cpu_seconds() - own)
        if foreign / (3 * (psutil.cpu_count() or 1)) < FOREIGN_CPU_FLAG:
            break
    return time.monotonic() - started


def quiet() -> None:
    """Wait for other processes to leave the CPU before a measurement that is not re-run on its own."""
    if (waited := wait_quiet()) > 4:
        log(f"  waited {waited:.0f}s for other processes to leave the CPU")


def watched_segment(url: str, calls: list[Call], concurrency: int) -> Segment:
    """:func:`run_segment`, noting how much CPU other processes on the machine took meanwhile."""
    busy, own = _busy_cpu_seconds(), _own_cpu_seconds()
    segment = run_segment(url, calls, concurrency)
    foreign = (_busy_cpu_seconds() - busy) - (_own_cpu_seconds() - own)
    segment.foreign_cpu = max(0.0, foreign) / (segment.wall * (psutil.cpu_count() or 1))
    return segment


class Matrix:
    """Segments per variant and concurrency, with the engine statistics each variant moved."""

    def __init__(self) -> None:
        self.segments: dict[str, dict[int, list[Segment]]] = defaultdict(lambda: defaultdict(list))
        self.engine: dict[str, dict[int, dict[str, float]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(float))
        )
        self.reruns: list[str] = []  # segments disturbed by other processes, then run again

    def run(self, url: str, variant: str, concurrency: int, calls: Callable[[int], list[Call]]) -> Segment:
        """Run one segment of ``calls(0)``; when other processes took over 10% of the CPU meanwhile, wait for a
        quiet machine and run it again on fresh prompts (``calls(attempt)``), up to ``RETRIES`` times."""
        for attempt in range(RETRIES + 1):
            before = scrape_engine(url)
            segment = watched_segment(url, calls(attempt), concurrency)
            after = scrape_engine(url)
            if attempt == RETRIES or not segment.foreign_cpu > FOREIGN_CPU_FLAG:
                break
            log(f"  {variant} c={concurrency}: other processes took {segment.foreign_cpu:.0%} CPU; repeating")
            self.reruns.append(f"{variant} c={concurrency}: {segment.foreign_cpu:.0%}")
            wait_quiet()
        for key, value in after.items():
            self.engine[variant][concurrency][key] += value - before.get(key, 0.0)
        self.segments[variant][concurrency].append(segment)
        return segment

    def figures(self) -> dict[str, dict[int, dict[str, float]]]:
        return {v: {c: point_figures(segs) for c, segs in by_c.items()} for v, by_c in self.segments.items()}

    def breakdown(self) -> dict[str, dict[int, dict[str, float]]]:
        """:func:`engine_breakdown` per variant and concurrency (client e2e: the mean, to match the sums)."""
        out: dict[str, dict[int, dict[str, float]]] = {}
        for variant, by_c in self.segments.items():
            for c, segments in by_c.items():
                samples = [s for seg in segments for s in seg.samples]
                mean_e2e = sum(s.e2e for s in samples) / len(samples) * 1000
                if entry := engine_breakdown(self.engine[variant][c], mean_e2e):
                    out.setdefault(variant, {})[c] = entry
        return out

    def foreign_cpu(self) -> dict[str, object]:
        """Other processes' share of the CPU during the segments: mean, max, and the segments above 10%."""
        shares = [
            (variant, c, i, seg.foreign_cpu)
            for variant, by_c in self.segments.items()
            for c, segments in by_c.items()
            for i, seg in enumerate(segments)
            if not math.isnan(seg.foreign_cpu)
        ]
        if not shares:
            return {}
        values = [share for *_, share in shares]
        flagged = [f"{v} c={c} #{i}: {share:.0%}" for v, c, i, share in shares if share > FOREIGN_CPU_FLAG]
        return {"mean": sum(values) / len(values), "max": max(values), "flagged": flagged, "reruns": self.reruns}

    def hit_rates(self) -> dict[str, float]:
        out = {}
        for variant, by_c in self.engine.items():
            queries = sum(stats.get("prefix_cache_queries", 0.0) for stats in by_c.values())
            if queries:
                out[variant] = sum(stats.get("prefix_cache_hits", 0.0) for stats in by_c.values()) / queries
        return out


def busy_note(segment: Segment) -> str:
    share = segment.foreign_cpu
    return f"  (other processes: {share:.0%} CPU)" if not math.isnan(share) and share > FOREIGN_CPU_FLAG else ""


def interleaved(
    matrix: Matrix,
    url: str,
    variants: tuple[str, ...],
    make: Callable[[str, str], Call],
    book: PromptBook,
    plans: dict[int, tuple[int, int]],
    opts: Options,
) -> None:
    """The main table's segments for ``variants`` on one server: per concurrency, per segment, every variant
    (rotating order) on the same fresh prompts (``plans``: see :func:`point_plan`)."""
    for c in opts.concurrencies:
        segments, requests = plans[c]
        for r in range(segments):
            for variant in rotated(variants, r + c):

                def calls(
                    attempt: int, variant: str = variant, c: int = c, r: int = r, n: int = requests
                ) -> list[Call]:
                    return [make(variant, p) for p in book.get(("main", c, r, attempt), n)]

                segment = matrix.run(url, variant, c, calls)
                if c > 1 or r % 4 == 3:
                    tput = segment.tokens / segment.wall
                    log(f"  c={c:<3} seg {r} {variant:<15} {tput:7.1f} tok/s{busy_note(segment)}")


def warm_up(url: str, variants: tuple[str, ...], make: Callable[[str, str], Call], book: PromptBook) -> None:
    for variant in variants:
        run_segment(url, [make(variant, p) for p in book.get(("warm", url, variant), 16)], 8)


def calibrate(
    url: str, make: Callable[[str, str], Call], book: PromptBook, opts: Options
) -> dict[int, tuple[int, int]]:
    """:func:`point_plan` for each concurrency, from a bare run (which also warms that batch size)."""
    plans = {}
    for c in opts.concurrencies:
        segment = run_segment(url, [make("bare", p) for p in book.get(("calibrate", c), max(2 * c, 4))], c)
        rate = len(segment.samples) / segment.wall
        plans[c] = point_plan(rate, c, opts)
        log(f"  c={c}: {rate:.2f} req/s bare -> {plans[c][0]} segments of {plans[c][1]} requests per point")
    return plans
