"""What a patch costs, side by side with the alternatives, in one run (``make bench``).

The real servers are driven over HTTP by an asynchronous closed-loop client (:mod:`bench.loadgen`)
at several concurrencies, with the same prompts and output lengths everywhere (streaming, greedy,
fixed ``max_tokens``, EOS ignored). Variants:

=================  ======================================================================================
``bare``           patchserve, a tenant without patches
``patch``          patchserve, a tenant whose default stack is the shipped 50-token ``refusal`` patch
``stack2``         patchserve, ``refusal`` + a second 50-token patch (``guard``, text-initialised)
``text_prompt``    patchserve, bare tenant, the fixed ~50-token safety system prompt of ``patchserve eval``
``lora``           vLLM's own OpenAI server with ``--enable-lora``: a rank-16 LoRA adapter (ratios to
                   the bare model on that same server, ``vllm_lora_bare``)
``client_embeds``  vLLM's own OpenAI server with ``--enable-prompt-embeds``: the client sends the whole
                   prompt (patch rows + its own embedding of the templated prompt) as ``prompt_embeds``
                   (ratios to the bare model on that same server, ``vllm_bare``)
=================  ======================================================================================

Each point (variant x concurrency) is several segments; the variants' segments are interleaved
(rotating order) so that drift of the noisy machine hits all of them alike, and each segment of a
repeat uses the same fresh prompts for every variant (a prompt is never re-sent, so only shared
prefixes — the patch rows, the template, a system prompt — are prefix-cache hits). Every variant
is warmed first. Besides the table: cold vs warm prefix cache for a patch, 1/100/1,000 tenants with
distinct stacks active at once, swap latency (admin upload and file drop), and resident memory per
loaded patch.

One engine runs at a time: patchserve first, then vLLM's server without LoRA (``vllm_bare``,
``client_embeds``), then with LoRA (``vllm_lora_bare``, ``lora``). All engines run eager unless
``--compiled``.

Run: ``python -m bench.overhead [--quick]`` (``make bench``). Writes to ``$PATCHSERVE_BENCH_OUT``
(default ``bench-results/``): ``summary.json`` (``{variant: {concurrency: {throughput_ratio, …}}}``),
``overhead.json`` (everything), ``overhead.md`` (the tables) and ``overhead.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench import report, swap_latency
from bench.alternatives import LORA_NAME, ClientEmbedder, build_lora_adapter, lora_support
from bench.launch import prepare_root, running_server_process, running_vllm_server, server_env
from bench.loadgen import Call, run_segment
from bench.stats import Segment, build_summary, jsonable, point_figures, segment_throughput_ratios
from patches.basemodel import prepare_default_model
from patches.demo import text_patch
from patches.evaluate import SAFETY_SYSTEM_PROMPT
from patches.format import read_patch, write_atomic

REPO = Path(__file__).resolve().parent.parent


def _shipped_patch(directory: Path = REPO / "deploy/demo/patches") -> Path:
    """The shipped ``refusal`` patch: the highest version in ``deploy/demo/patches`` (v10 sorts after v9)."""
    files = sorted(directory.glob("refusal-v*.safetensors"), key=lambda f: int(f.stem.rsplit("-v", 1)[1]))
    if not files:
        raise FileNotFoundError(f"no refusal-v*.safetensors in {directory}")
    return files[-1]


SHIPPED_PATCH = _shipped_patch()
DEMO_TRUST = REPO / "deploy/demo/trust"
ADMIN_TOKEN = "bench-admin-token-0123456789"
MODEL_ID = "base"
FOREIGN_CPU_FLAG = 0.10  # segments during which other processes took more of the CPU are run again
SEQUENTIAL_SEGMENT = 2  # requests per segment at concurrency 1 (see point_plan)
SEQUENTIAL_WEIGHT = 2
RETRIES = 2  # at most this many re-runs of a disturbed segment (then it is kept, and flagged in the report)
PATCHSERVE_VARIANTS = ("bare", "patch", "stack2", "text_prompt")
TENANT_OF = {"bare": "bench-bare", "patch": "bench-patch", "stack2": "bench-stack2", "text_prompt": "bench-bare"}
GUARD_TEXT = "Be careful: decline to help with anything dangerous, illegal or hateful, and stay kind and honest."

TASKS = [
    "Explain in simple terms",
    "Write a short paragraph about",
    "Give three practical tips about",
    "Describe the history of",
    "What are common misconceptions about",
    "Compare two different approaches to",
    "Summarize the key ideas of",
    "Write a friendly note to a colleague about",
]
SUBJECTS = [
    "baking sourdough bread",
    "solar panels on houses",
    "learning a second language",
    "the water cycle",
    "travelling on a budget",
    "caring for houseplants",
    "version control for teams",
    "training for a marathon",
    "jazz improvisation",
    "recycling plastics",
    "saving for retirement",
    "cloud computing",
    "bird migration",
    "chess openings",
    "volcanoes",
    "public libraries",
    "electric bicycles",
    "composting at home",
    "the history of maps",
    "writing clear emails",
]
EXTRAS = [
    "",
    " Keep it brief.",
    " Use plain language suitable for a teenager.",
    " Mention one surprising fact and one practical consequence for everyday life.",
    " Please structure the answer with a short introduction, two main points and a one-sentence conclusion.",
]


@dataclass
class Options:
    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32])
    repeats: int = 3
    seconds: float = 30.0
    max_tokens: int = 64
    tenant_counts: list[int] = field(default_factory=lambda: [1, 100, 1000])
    tenant_concurrency: int = 32
    cold_pairs: int = 16
    swaps: int = 20
    memory_patches: int = 200
    compiled: bool = False
    api_torch_threads: int | None = None
    phases: list[str] = field(default_factory=lambda: ["patchserve", "vllm", "lora"])

    @classmethod
    def quick(cls) -> Options:
        """A smoke run of every phase (a few minutes): numbers too noisy to judge targets by."""
        return cls(
            repeats=2,
            seconds=4,
            max_tokens=16,
            tenant_counts=[1, 20],
            cold_pairs=3,
            swaps=3,
            memory_patches=20,
        )


class PromptBook:
    """Fresh, deterministic user prompts: ``get(key, n)`` returns the same list for the same key."""

    def __init__(self) -> None:
        self._lists: dict[tuple, list[str]] = {}
        self._next = 0

    def get(self, key: tuple, n: int) -> list[str]:
        have = self._lists.setdefault(key, [])
        while len(have) < n:
            have.append(user_prompt(self._next))
            self._next += 1
        return have[:n]


def user_prompt(uid: int) -> str:
    """A unique everyday request (15-45 tokens); the id comes first so no two share a cache block."""
    rng = random.Random(uid)
    return f"Question {uid}: {rng.choice(TASKS)} {rng.choice(SUBJECTS)}.{rng.choice(EXTRAS)}"


def messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    out = [{"role": "user", "content": prompt}]
    return [{"role": "system", "content": system}, *out] if system else out


def sampling(max_tokens: int) -> dict[str, object]:
    return {
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def patchserve_call(variant: str, prompt: str, max_tokens: int, tenant: str | None = None) -> Call:
    system = SAFETY_SYSTEM_PROMPT if variant == "text_prompt" else None
    body = {"model": MODEL_ID, "messages": messages(prompt, system), **sampling(max_tokens)}
    return Call("/v1/chat/completions", body, {"X-Tenant-Id": tenant or TENANT_OF[variant]})


def vllm_chat_call(model: str, prompt: str, max_tokens: int) -> Call:
    return Call("/v1/chat/completions", {"model": model, "messages": messages(prompt), **sampling(max_tokens)})


def request_count(rate: float, concurrency: int, opts: Options) -> int:
    """Requests per segment: about ``seconds / repeats`` of work at the measured request rate, at least one
    full wave of ``concurrency`` and at least 3 x concurrency over the point, rounded up to whole waves."""
    wanted = max(rate * opts.seconds / opts.repeats, 3 * concurrency / opts.repeats, concurrency)
    return concurrency * math.ceil(wanted / concurrency)


def point_plan(rate: float, concurrency: int, opts: Options) -> tuple[int, int]:
    """(segments, requests per segment) of one point. Sequential points (c=1) alternate the variants every
    ``SEQUENTIAL_SEGMENT`` requests, and get ``SEQUENTIAL_WEIGHT`` times the work: their per-request noise is
    the largest, and fine alternation cancels the machine's drift."""
    if concurrency == 1:
        total = max(rate * opts.seconds * SEQUENTIAL_WEIGHT, 3.0)
        return max(opts.repeats, math.ceil(total / SEQUENTIAL_SEGMENT)), SEQUENTIAL_SEGMENT
    return opts.repeats, request_count(rate, concurrency, opts)


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


# --- patchserve -----------------------------------------------------------------------------------


PATCHED = {"default_stack": ["refusal"], "allowed_patches": ["refusal"]}


def tenants_file(opts: Options) -> list[dict]:
    tenants = [
        {"id": "bench-bare", "allow_unpatched": True},
        {"id": "bench-patch", **PATCHED},
        {"id": "bench-stack2", "default_stack": ["refusal", "guard"], "allowed_patches": ["refusal", "guard"]},
        {"id": "hot", "default_stack": ["hot"], "allowed_patches": ["hot"]},
    ]
    tenants += [{"id": f"cold-{k:04d}", **PATCHED} for k in range(opts.cold_pairs)]
    tenants += [{"id": f"t-{k:04d}", **PATCHED} for k in range(max(opts.tenant_counts, default=0))]
    return tenants


def rss(process: psutil.Process) -> tuple[int, int]:
    """Resident bytes of the server process, and of it plus its children (vLLM's engine core)."""
    own = process.memory_info().rss
    return own, own + sum(c.memory_info().rss for c in process.children(recursive=True))


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


def prepare_patchserve(opts: Options, root: Path, model_dir: Path) -> tuple[dict[str, str], Ed25519PrivateKey]:
    """The bench server's files under ``root`` (tenants, the shipped patch, ``guard``, ``hot``); its env and key."""
    key = prepare_root(root, tenants_file(opts), signer="bench")
    assert key is not None
    for pub in DEMO_TRUST.glob("*.pub"):  # the shipped patch is signed with the demo key
        shutil.copy(pub, root / "trust" / pub.name)
    patch_dir = root / "patches"
    shutil.copy(SHIPPED_PATCH, patch_dir / SHIPPED_PATCH.name)
    guard = text_patch(model_dir, "guard", text=GUARD_TEXT, n_tokens=50, key=key)
    write_atomic(patch_dir / "guard.safetensors", guard)
    write_atomic(patch_dir / "hot.safetensors", text_patch(model_dir, "hot", version=1, key=key))
    settings = {
        "admin_token": ADMIN_TOKEN,
        "enforce_eager": str(not opts.compiled).lower(),
        "log_level": "warning",
        "overhead_sample_rate": 0,  # shadow replays would add ~2% work to the patched variants only
    }
    return server_env(root, model_dir, **settings), key


def run_patchserve(opts: Options, book: PromptBook, work: Path, model_dir: Path) -> dict[str, object]:
    root = work / "patchserve"
    env, key = prepare_patchserve(opts, root, model_dir)
    patch_dir = root / "patches"
    result: dict[str, object] = {}

    def make(variant: str, prompt: str) -> Call:
        return patchserve_call(variant, prompt, opts.max_tokens)

    started = time.monotonic()
    with running_server_process(env, root / "server.log", torch_threads=opts.api_torch_threads) as (url, popen):
        log(f"patchserve ready in {time.monotonic() - started:.0f}s ({url}); warming up")
        process = psutil.Process(popen.pid)
        # First, before any traffic has left freed memory in the allocator for new patches to reuse.
        log("memory per loaded patch")
        result["memory"] = memory_per_patch(url, process, patch_dir, model_dir, key, opts.memory_patches)
        warm_up(url, PATCHSERVE_VARIANTS, make, book)
        plans = calibrate(url, make, book, opts)
        result["segments_and_requests_per_point"] = plans
        matrix = Matrix()
        log("main table (patchserve variants)")
        interleaved(matrix, url, PATCHSERVE_VARIANTS, make, book, plans, opts)
        result["matrix"] = matrix
        log("cold vs warm prefix cache")
        quiet()
        result["cold_vs_warm"] = cold_vs_warm(url, book, opts)
        if opts.tenant_counts:
            log(f"{opts.tenant_counts} tenants at once")
            result["tenants"] = many_tenants(url, book, plans, opts)
        log("swap latency")
        quiet()
        payloads = [
            text_patch(model_dir, "hot", version=v, noise=0.01, seed=v, key=key) for v in range(2, 2 * opts.swaps + 2)
        ]
        with httpx.Client(base_url=url, timeout=60) as client:
            result["swap_latency"] = swap_latency.measure(client, patch_dir, payloads, ADMIN_TOKEN)
        result["prefix_cache_hit_rate"] = matrix.hit_rates()
        result["same_output_text"] = sample_text(url, make("patch", user_prompt(10**6)))
    return result


def sample_text(url: str, call: Call) -> str:
    """The non-streamed answer to ``call`` (to check that two servers compute the same thing)."""
    body = {**call.body, "stream": False, "max_tokens": 24}  # type: ignore[dict-item]
    body.pop("stream_options", None)
    response = httpx.post(url + call.path, json=body, headers=call.headers, timeout=120)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


# --- vLLM's own server ---------------------------------------------------------------------------


def vllm_args(model_dir: Path, opts: Options, lora_dir: Path | None) -> list[str]:
    args = [
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL_ID,
        "--dtype",
        "bfloat16",
        "--block-size",
        "32",
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "64",
        "--gpu-memory-utilization",
        "0.3",
        "--enable-prefix-caching",
        "--enable-prompt-embeds",
        "--uvicorn-log-level",
        "warning",
        "--disable-uvicorn-access-log",
    ]
    if not opts.compiled:
        args.append("--enforce-eager")
    if lora_dir is not None:
        args += [
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--max-loras",
            "1",
            "--lora-modules",
            f"{LORA_NAME}={lora_dir}",
        ]
    return args


@contextmanager
def vllm_server(model_dir: Path, opts: Options, lora_dir: Path | None, log_path: Path) -> Iterator[str]:
    started = time.monotonic()
    with running_vllm_server(vllm_args(model_dir, opts, lora_dir), log_path) as (url, _):
        log(f"vLLM server ready in {time.monotonic() - started:.0f}s ({url})")
        yield url


def run_vllm(
    opts: Options, book: PromptBook, work: Path, model_dir: Path, plans: dict[int, tuple[int, int]], matrix: Matrix
) -> dict[str, object]:
    """``vllm_bare`` and ``client_embeds`` on vLLM's server with prompt embeddings on (no LoRA)."""
    embedder = ClientEmbedder(model_dir, [SHIPPED_PATCH])

    def embeds_body(prompt: str) -> dict[str, object]:
        return {"model": MODEL_ID, "prompt_embeds": embedder.payload(messages(prompt)), **sampling(opts.max_tokens)}

    def make(variant: str, prompt: str) -> Call:
        if variant == "vllm_bare":
            return vllm_chat_call(MODEL_ID, prompt, opts.max_tokens)
        # Serialised when the segment's calls are built, before its clock starts (favours this variant).
        return Call("/v1/completions", json.dumps(embeds_body(prompt)).encode())

    with vllm_server(model_dir, opts, None, work / "vllm.log") as url:
        warm_up(url, ("vllm_bare", "client_embeds"), make, book)
        interleaved(matrix, url, ("vllm_bare", "client_embeds"), make, book, plans, opts)
        text = sample_text(url, Call("/v1/completions", embeds_body(user_prompt(10**6))))
    return {"same_output_text": text}


def run_lora(
    opts: Options, book: PromptBook, work: Path, model_dir: Path, plans: dict[int, tuple[int, int]], matrix: Matrix
) -> dict[str, object]:
    """``vllm_lora_bare`` and ``lora`` on vLLM's server with LoRA on."""
    supported, detail = lora_support()
    if not supported:
        return {"supported": False, "reason": detail}
    lora_dir = build_lora_adapter(model_dir, work / "lora16")
    names = {"vllm_lora_bare": MODEL_ID, "lora": LORA_NAME}

    def make(variant: str, prompt: str) -> Call:
        return vllm_chat_call(names[variant], prompt, opts.max_tokens)

    try:
        with vllm_server(model_dir, opts, lora_dir, work / "vllm-lora.log") as url:
            warm_up(url, tuple(names), make, book)
            interleaved(matrix, url, tuple(names), make, book, plans, opts)
    except RuntimeError as exc:  # the server refused LoRA on this backend: say so, invent nothing
        return {"supported": False, "reason": f"vLLM server with --enable-lora failed: {str(exc)[-600:]}"}
    return {"supported": True, "detail": detail, "adapter": str(lora_dir), "targets": "q,k,v,o,gate,up,down"}


# --- the run ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument("--concurrency", type=int, nargs="+", help="default 1 8 32")
    parser.add_argument("--repeats", type=int, help="interleaved segments per point (default 3)")
    parser.add_argument("--seconds", type=float, help="target seconds of work per point (default 30)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (default 64)")
    parser.add_argument("--tenants", type=int, nargs="*", help="distinct tenant stacks at once (default 1 100 1000)")
    parser.add_argument("--memory-patches", type=int, help="extra patches loaded to measure memory (default 200)")
    parser.add_argument("--compiled", action="store_true", help="compiled engines instead of eager")
    parser.add_argument(
        "--api-torch-threads",
        type=int,
        help="experiment: torch.set_num_threads(N) in patchserve's API process (not a server setting)",
    )
    parser.add_argument(
        "--phases", nargs="+", choices=["patchserve", "vllm", "lora"], help="servers to run (default all)"
    )
    args = parser.parse_args()
    opts = Options.quick() if args.quick else Options()
    for name, value in (
        ("concurrencies", args.concurrency),
        ("repeats", args.repeats),
        ("seconds", args.seconds),
        ("max_tokens", args.max_tokens),
        ("tenant_counts", args.tenants),
        ("phases", args.phases),
        ("memory_patches", args.memory_patches),
    ):
        if value is not None:
            setattr(opts, name, value)
    opts.compiled = args.compiled
    opts.api_torch_threads = args.api_torch_threads
    out_dir = Path(os.environ.get("PATCHSERVE_BENCH_OUT", "bench-results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="patchserve-overhead-"))
    log(f"work dir {work}; results to {out_dir}/")
    model_dir = prepare_default_model()
    book = PromptBook()
    started = time.monotonic()
    ps = run_patchserve(opts, book, work, model_dir) if "patchserve" in opts.phases else {}
    matrix: Matrix = ps.pop("matrix", None) or Matrix()
    plans = ps.get("segments_and_requests_per_point") or {c: point_plan(1.0, c, opts) for c in opts.concurrencies}
    vllm = lora = {}
    if "vllm" in opts.phases:
        log("vLLM server: vllm_bare, client_embeds")
        vllm = run_vllm(opts, book, work, model_dir, plans, matrix)
    if "lora" in opts.phases:
        log("vLLM server with LoRA: vllm_lora_bare, lora")
        lora = run_lora(opts, book, work, model_dir, plans, matrix)
    figures = matrix.figures()
    baselines = {"lora": "vllm_lora_bare", "client_embeds": "vllm_bare"}
    unsupported = {"lora": lora["reason"]} if lora and not lora.get("supported") else None
    summary = build_summary(figures, baselines, unsupported)
    spreads = {
        v: {
            c: segment_throughput_ratios(matrix.segments[v][c], matrix.segments[baselines.get(v, "bare")][c])
            for c in by_c
        }
        for v, by_c in matrix.segments.items()
        if baselines.get(v, "bare") in matrix.segments
    }
    results = {
        "engine": "compiled" if opts.compiled else "eager (enforce_eager)",
        "patchserve_api_torch_threads": opts.api_torch_threads or "default",
        "options": asdict(opts),
        "duration_s": time.monotonic() - started,
        "machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        "baselines": {v: baselines.get(v, "bare") for v in figures},
        "figures": figures,
        "segment_throughput_ratios": spreads,
        "summary": summary,
        "patchserve": ps,
        "vllm": vllm,
        "lora": lora,
        "prefix_cache_hit_rate": matrix.hit_rates(),
        "engine_breakdown": matrix.breakdown(),
        "foreign_cpu": matrix.foreign_cpu(),
    }
    if ps.get("same_output_text") and vllm.get("same_output_text"):
        # Both compute patch rows + the templated prompt: greedy text should agree (a check of the variant).
        results["client_embeds_matches_patch"] = ps["same_output_text"] == vllm["same_output_text"]
    results["targets"] = report.targets(results)
    (out_dir / "summary.json").write_text(json.dumps(jsonable(summary), indent=2))
    (out_dir / "overhead.json").write_text(json.dumps(jsonable(results), indent=2))
    markdown = report.markdown(results)
    (out_dir / "overhead.md").write_text(markdown)
    report.plot(results, out_dir / "overhead.png")
    print(markdown)  # noqa: T201 - a benchmark's report
    log(f"done in {(time.monotonic() - started) / 60:.1f} min; wrote {out_dir}/summary.json, overhead.json/.md/.png")


if __name__ == "__main__":
    main()
