"""Prometheus metrics: every ``patchserve_*`` family, the per-request tracker and the status middleware.

Label values are bounded by construction: ``tenant`` is an authenticated tenant id from the tenant
file (``-`` before authentication), ``stack`` the applied stack of loaded patches (``-`` before
resolution, ``none`` for the bare model) and at most ``max_stacks`` distinct stacks get their own
series (the rest share ``other``). Nothing a client sends becomes a label value unchecked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patches.errors import RejectReason
from patches.format import Patch
from patches.refusal import is_refusal

if TYPE_CHECKING:
    from server.engine import ChunkTiming

# No ``*_created`` series: they double the series count and no dashboard reads them (vLLM does the same).
disable_created_metrics()

UNRESOLVED = "-"
OVERFLOW_STACK = "other"
TRACKED_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}

# vLLM's buckets, with finer steps where a small model on CPU lands.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
SWAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# Control-plane failures counted beside the patch refusals: a ledger or patch-file write that failed,
# a refused tenant-file reload, an unreadable revocation list.
CONTROL_FAILURES = ("state_write", "tenant_config", "revocations")


class _PatchInfoCollector(Collector):
    """``patchserve_patch_info`` and ``patchserve_patches_loaded``, read from the registry at scrape time
    (so an unloaded version disappears at once instead of lingering as a stale series)."""

    def __init__(self, loaded: Callable[[], Iterable[Patch]]) -> None:
        self._loaded = loaded

    def collect(self) -> Iterator[InfoMetricFamily | GaugeMetricFamily]:
        patches = list(self._loaded())
        info = InfoMetricFamily("patchserve_patch", "Loaded patch versions (value 1).")
        for p in patches:
            info.add_metric(
                [],
                {
                    "patch": p.name,
                    "version": str(p.version),
                    "sha256": p.digest.removeprefix("sha256:"),
                    "signer": p.meta.signer or "",
                },
            )
        yield info
        yield GaugeMetricFamily("patchserve_patches_loaded", "Patch versions loaded.", value=len(patches))


@dataclass(frozen=True)
class _Tally:
    """Completions seen and those a detector flags, per tenant/stack and per patch version: the four
    counters behind one rate (refusals, toxic completions), moved together."""

    seen: Counter
    flagged: Counter
    patch_seen: Counter
    patch_flagged: Counter

    def add(self, tenant: str, stack: str, versions: Iterable[tuple[str, str]], seen: int, flagged: int) -> None:
        self.seen.labels(tenant, stack).inc(seen)
        self.flagged.labels(tenant, stack).inc(flagged)
        for name, version in versions:
            self.patch_seen.labels(name, version).inc(seen)
            self.patch_flagged.labels(name, version).inc(flagged)


class Metrics:
    """All of patchserve's own metric families, in one registry of their own.

    Args:
        registry: Where the families live (a fresh one by default, so apps in one process don't clash).
        max_stacks: Distinct ``stack`` label values before new stacks are folded into ``other``.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, max_stacks: int = 256) -> None:
        self.registry = registry or CollectorRegistry()
        self.max_stacks = max_stacks
        self._stacks: set[str] = set()
        self._lock = threading.Lock()
        r, ts = self.registry, ("tenant", "stack")
        self.requests = Counter(
            "patchserve_requests", "Requests by final HTTP status.", [*ts, "endpoint", "status"], registry=r
        )
        self.in_flight = Gauge("patchserve_requests_in_flight", "API requests being served.", registry=r)
        self.ttft = Histogram(
            "patchserve_time_to_first_token_seconds", "Time to first token.", ts, buckets=TTFT_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "patchserve_e2e_request_latency_seconds", "Admission to last token.", ts, buckets=E2E_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "patchserve_inter_token_latency_seconds", "Time between output tokens.", ts, buckets=ITL_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("patchserve_prompt_tokens", "Prompt tokens sent by clients.", ts, registry=r)
        self.patch_tokens = Counter(
            "patchserve_patch_tokens", "Patch tokens added in front of prompts.", ts, registry=r
        )
        self.patch_cached_tokens = Counter(
            "patchserve_patch_cached_tokens", "Patch tokens served from the prefix cache.", ts, registry=r
        )
        self.generation_tokens = Counter("patchserve_generation_tokens", "Output tokens.", ts, registry=r)
        self.completions = Counter("patchserve_completions", "Finished completions (choices).", ts, registry=r)
        self.refusals = Counter(
            "patchserve_refusals", "Completions the refusal detector calls refusals.", ts, registry=r
        )
        pv = ("patch", "version")
        self.patch_completions = Counter(
            "patchserve_patch_completions", "Completions served with this patch version in the stack.", pv, registry=r
        )
        self.patch_refusals = Counter(
            "patchserve_patch_refusals", "Refusals served with this patch version in the stack.", pv, registry=r
        )
        # server/toxicity_meter.py: completions scored by the offline toxicity classifier, off the request path
        self.toxicity_scored = Counter(
            "patchserve_toxicity_scored", "Completions scored by the toxicity classifier.", ts, registry=r
        )
        self.toxic_completions = Counter(
            "patchserve_toxic_completions", "Completions the toxicity classifier scores >= 0.5.", ts, registry=r
        )
        self.patch_toxicity_scored = Counter(
            "patchserve_patch_toxicity_scored",
            "Scored completions with this patch version in the stack.",
            pv,
            registry=r,
        )
        self.patch_toxic_completions = Counter(
            "patchserve_patch_toxic_completions",
            "Toxic completions with this patch version in the stack.",
            pv,
            registry=r,
        )
        self.toxicity_dropped = Counter(
            "patchserve_toxicity_dropped", "Completions not scored because the scoring queue was full.", registry=r
        )
        self._refusal_tally = _Tally(self.completions, self.refusals, self.patch_completions, self.patch_refusals)
        self._toxicity_tally = _Tally(
            self.toxicity_scored, self.toxic_completions, self.patch_toxicity_scored, self.patch_toxic_completions
        )
        phase = (*ts, "phase")
        self.overhead_samples = Counter("patchserve_overhead_samples", "Shadow replay pairs measured.", ts, registry=r)
        self.overhead_patched = Counter(
            "patchserve_overhead_patched_seconds", "Shadow replays with the patch: summed latency.", phase, registry=r
        )
        self.overhead_baseline = Counter(
            "patchserve_overhead_baseline_seconds",
            "Shadow replays without the patch: summed latency.",
            phase,
            registry=r,
        )
        self.overhead_failures = Counter(
            "patchserve_overhead_replay_failures", "Shadow replays that failed (each loses one sample).", registry=r
        )
        self.overhead_ratio = Gauge(
            "patchserve_latency_overhead_ratio",
            "Patched / unpatched latency - 1 over the recent shadow samples.",
            phase,
            registry=r,
        )
        self.load_failures = Counter(
            "patchserve_patch_load_failures", "Patch files or operations refused.", ["reason"], registry=r
        )
        # every series exists from the start, so increase() sees the first failure
        for reason in [*RejectReason, *CONTROL_FAILURES]:
            self.load_failures.labels(str(reason))
        self.task_failures = Counter(
            "patchserve_background_task_failures",
            "Background task crashes (each is logged and the task restarted).",
            ["task"],
            registry=r,
        )
        self.task_up = Gauge(
            "patchserve_background_task_up", "1 while a background task runs healthily, else 0.", ["task"], registry=r
        )
        self.swaps = Counter(
            "patchserve_patch_swaps", "Patch versions made live (start-up loads included).", ["patch"], registry=r
        )
        self.swap_seconds = Histogram(
            "patchserve_patch_swap_seconds", "File or upload received → version live.", buckets=SWAP_BUCKETS, registry=r
        )

    def watch_registry(self, loaded: Callable[[], Iterable[Patch]]) -> None:
        """Export the loaded patches (info metric) from ``loaded`` at every scrape."""
        self.registry.register(_PatchInfoCollector(loaded))

    def stack_label(self, applied: str) -> str:
        """``applied`` as a label value, or ``other`` once ``max_stacks`` distinct stacks have been seen."""
        with self._lock:
            if applied in self._stacks:
                return applied
            if len(self._stacks) >= self.max_stacks:
                return OVERFLOW_STACK
            self._stacks.add(applied)
            return applied

    # -- patch lifecycle (the registry's listener) ------------------------------------------------
    def published(self, patch: Patch, seconds: float) -> None:
        self.swaps.labels(patch.name).inc()
        self.swap_seconds.observe(seconds)

    def rejected(self, reason: str) -> None:
        self.load_failures.labels(reason).inc()

    # -- completions -------------------------------------------------------------------------------
    def classify(self, tenant: str, stack: str, patches: Iterable[Patch], texts: Iterable[str]) -> None:
        """Count completions and refusals (by the shared detector) per tenant/stack and per patch version."""
        texts = list(texts)
        versions = [(p.name, str(p.version)) for p in patches]
        self._refusal_tally.add(tenant, stack, versions, len(texts), sum(is_refusal(t) for t in texts))

    def count_toxicity(
        self, tenant: str, stack: str, versions: Iterable[tuple[str, str]], scored: int, toxic: int
    ) -> None:
        """Count scored and toxic completions (``server/toxicity_meter.py``) per tenant/stack and per
        patch version (``(name, version)`` pairs)."""
        self._toxicity_tally.add(tenant, stack, versions, scored, toxic)

    def render(self, *others: CollectorRegistry) -> bytes:
        """The exposition text of this registry followed by ``others`` (vLLM's)."""
        return b"".join(generate_latest(reg) for reg in (self.registry, *others))


@dataclass
class RequestTracker:
    """Times one admitted request and counts its tokens, under its tenant/stack labels (the labelled
    series are looked up once, at :meth:`begin`, not once per token)."""

    metrics: Metrics
    tenant: str
    stack: str
    patch_len: int
    start: float
    last: float | None = None
    cached: int = 0
    _generated: Counter = field(init=False, repr=False)
    _ttft: Histogram = field(init=False, repr=False)
    _itl: Histogram = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m, labels = self.metrics, (self.tenant, self.stack)
        self._generated = m.generation_tokens.labels(*labels)
        self._ttft, self._itl = m.ttft.labels(*labels), m.itl.labels(*labels)

    @classmethod
    def begin(cls, metrics: Metrics, tenant: str, stack: str, prompt_tokens: int, patch_len: int) -> RequestTracker:
        metrics.prompt_tokens.labels(tenant, stack).inc(prompt_tokens)
        metrics.patch_tokens.labels(tenant, stack).inc(patch_len)
        return cls(metrics, tenant, stack, patch_len, time.perf_counter())

    def tokens(self, n: int, cached_tokens: int, timing: ChunkTiming | None = None) -> None:
        """``n`` new output tokens arrived now (``cached_tokens``: the engine's prefix-cache hits).

        With ``timing`` (a whole generation delivered at once) the time to the first token and the
        gaps between tokens are the engine's: its first-token latency, and its decode time spread evenly
        over the ``n - 1`` later tokens (so the ITL sum and count match a token-by-token delivery)."""
        if n <= 0:
            return
        now = time.perf_counter()
        self._generated.inc(n)
        if timing is not None:
            if self.last is None:
                self._ttft.observe(timing.first_token)
            for _ in range(n - 1):
                self._itl.observe(timing.decode / (n - 1))
        elif self.last is None:
            self._ttft.observe(now - self.start)
        else:
            gap = (now - self.last) / n
            for _ in range(n):
                self._itl.observe(gap)
        self.last = now
        self.cached = max(self.cached, cached_tokens)

    def finish(self) -> None:
        """The generation completed (not called for failed or cancelled ones)."""
        labels = (self.tenant, self.stack)
        self.metrics.e2e.labels(*labels).observe(time.perf_counter() - self.start)
        self.metrics.patch_cached_tokens.labels(*labels).inc(min(self.cached, self.patch_len))


class MetricsMiddleware:
    """Counts API requests by final status and keeps the in-flight gauge (pure ASGI, so streams pass
    straight through). Tenant and stack labels come from ``scope["state"]``, set at stack resolution."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = TRACKED_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        status = "500"

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            state = scope.get("state") or {}
            labels = state.get("metric_labels", (UNRESOLVED, UNRESOLVED))
            self.metrics.requests.labels(*labels, endpoint, status).inc()
