"""Per-stack latency overhead, measured on live traffic by shadow replays.

Method. With probability ``rate``, a patched request that finished is replayed in the background:

1. under a fresh cache salt, one-token warm-ups with and without the patch on the *previous* sampled
   prompt: this puts into the prefix cache what steady traffic keeps there — the patch rows and the
   prompt head requests share (the chat template) — but not this prompt's own tokens;
2. the request *with* its patch stack and 3. *without* it, under that salt: same prompt, greedy,
   exactly the number of output tokens the real request produced (EOS ignored), in alternating
   order from one sample to the next.

The two replays thus start from the same cache state and differ only by the patch, as the real
request and its unpatched twin would. (The first sample only records its prompt.) Replays never
reach the user-facing metrics and are capped at ``max_tokens``.

Scheduling. A request that passes the rate gate becomes the *pending* sample of its (tenant, stack)
key: at most one per key, a newer one replacing the older, so memory is bounded by the number of
stacks (whose labels the metrics already bound). One worker task, started when a sample is pending
and ending when none is, replays one pair at a time (bounded extra load), each time for the pending
stack measured least recently. So every stack that keeps getting traffic is measured — a stack waits
at most one pair per other active stack — however the requests of different stacks interleave. A
failed replay loses that sample only: it is logged as a warning and counted in ``failures``.

The overhead of a stack is ``sum(patched) / sum(baseline) - 1`` over the last ``window`` pairs, for
TTFT and for end-to-end latency, exported as a gauge; the summed seconds are exported as counters
too, so PromQL can form the same ratio over any range.

Cost per sample: two prefills of the prompt, two one-token warm-ups and 2 x the output tokens, i.e.
about twice the sampled request; at the default rate (1%) at most about 2% more engine work (less
when samples replace each other while the worker is busy). Set the rate to 0 to turn sampling off.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace

from server.engine import Engine, EngineRequest, SamplingSpec
from server.metrics import Metrics

log = logging.getLogger(__name__)

PHASES = ("ttft", "e2e")

Key = tuple[str, str]  # (tenant, stack)


@dataclass(frozen=True)
class Timing:
    ttft: float
    e2e: float

    def get(self, phase: str) -> float:
        return self.ttft if phase == "ttft" else self.e2e


@dataclass(frozen=True)
class _Pending:
    request: EngineRequest
    n_tokens: int


class OverheadSampler:
    """Measures patched vs unpatched latency on a sample of real requests, fairly across stacks.

    Args:
        engine: The engine the replays run on.
        metrics: Where samples are recorded.
        rate: Share of patched requests sampled (0 turns the sampler off).
        window: Pairs per stack the overhead gauge averages over.
        max_tokens: Cap on replayed output tokens.
        seed: Seeds the sampling decision (tests).

    Attributes:
        failures: Replays that raised (each lost one sample).
    """

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        rate: float,
        window: int = 32,
        max_tokens: int = 128,
        seed: int | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.rate = rate
        self.window = window
        self.max_tokens = max_tokens
        self.failures = 0
        self._rng = random.Random(seed)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._patched_first = True
        self._recent: dict[Key, deque[tuple[Timing, Timing]]] = {}
        self._previous_prompt: list[int] | None = None
        self._pending: dict[Key, _Pending] = {}
        self._turns = itertools.count()
        self._last_turn: dict[Key, int] = {}  # key -> turn of its latest measurement (attempt)

    @property
    def pending(self) -> int:
        """Stacks with a sample waiting for the worker."""
        return len(self._pending)

    def offer(self, request: EngineRequest, tenant: str, stack: str, output_tokens: int) -> bool:
        """Maybe sample ``request`` (a finished, patched one); returns whether it is now pending."""
        if request.layout is None or output_tokens < 1 or self.rate <= 0 or self._closed:
            return False
        if self._rng.random() >= self.rate:
            return False
        key = (tenant, stack)
        self._pending[key] = _Pending(request, min(output_tokens, self.max_tokens))  # replaces an older one
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return True

    def _next_key(self) -> Key:
        """The pending stack measured least recently (never measured first; ties: longest pending)."""
        return min(self._pending, key=lambda k: self._last_turn.get(k, -1))

    async def _drain(self) -> None:
        """The worker: replay pending samples, one pair at a time, until none is left."""
        while self._pending:
            key = self._next_key()
            sample = self._pending.pop(key)
            self._last_turn[key] = next(self._turns)
            try:
                await self._measure(sample.request, *key, sample.n_tokens)
            except Exception:  # noqa: BLE001 - a failed replay only loses its sample, never the worker
                self.failures += 1
                self.metrics.overhead_failures.inc()
                log.warning("overhead replay failed for tenant %r stack %r", *key, exc_info=True)

    async def _measure(self, request: EngineRequest, tenant: str, stack: str, n_tokens: int) -> None:
        previous, self._previous_prompt = self._previous_prompt, request.prompt_token_ids
        if previous is None:
            return
        salt = f"shadow-{uuid.uuid4().hex}"
        sampling = SamplingSpec(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
        # streamed: a replay times its first token, whatever the request it samples asked for
        patched = replace(request, request_id="", sampling=sampling, cache_salt=salt, stream=True)
        bare = replace(patched, layout=None)
        one_token = SamplingSpec(max_tokens=1, temperature=0.0)
        for variant in (patched, bare):
            await self._time(replace(variant, prompt_token_ids=previous, sampling=one_token))
        order = (patched, bare) if self._patched_first else (bare, patched)
        self._patched_first = not self._patched_first
        timings = {id(r): await self._time(r) for r in order}
        self.record(tenant, stack, timings[id(patched)], timings[id(bare)])

    async def _time(self, request: EngineRequest) -> Timing:
        request = replace(request, request_id=f"shadow-{uuid.uuid4().hex}")
        start = time.perf_counter()
        first: float | None = None
        async for chunk in self.engine.generate(request):
            if first is None and chunk.n_tokens:
                first = time.perf_counter()
        end = time.perf_counter()
        return Timing(ttft=(first or end) - start, e2e=end - start)

    def record(self, tenant: str, stack: str, patched: Timing, baseline: Timing) -> None:
        """Add one measured pair to the counters and to the stack's window, and refresh its gauge."""
        m = self.metrics
        m.overhead_samples.labels(tenant, stack).inc()
        recent = self._recent.setdefault((tenant, stack), deque(maxlen=self.window))
        recent.append((patched, baseline))
        for phase in PHASES:
            m.overhead_patched.labels(tenant, stack, phase).inc(patched.get(phase))
            m.overhead_baseline.labels(tenant, stack, phase).inc(baseline.get(phase))
            base_sum = sum(b.get(phase) for _, b in recent)
            if base_sum > 0:
                ratio = sum(p.get(phase) for p, _ in recent) / base_sum - 1
                m.overhead_ratio.labels(tenant, stack, phase).set(ratio)

    async def join(self) -> None:
        """Wait until no sample is pending or being replayed."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop sampling: drop pending samples and cancel a replay in progress (shutdown)."""
        self._closed = True
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
