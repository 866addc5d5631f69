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
overlap each other (one pair at a time; samples offered meanwhile are skipped), never reach the
user-facing metrics, and are capped at ``max_tokens``.
The overhead of a stack is ``sum(patched) / sum(baseline) - 1`` over the last ``window`` pairs, for
TTFT and for end-to-end latency, exported as a gauge; the summed seconds are exported as counters
too, so PromQL can form the same ratio over any range.

Cost per sample: two prefills of the prompt, two one-token warm-ups and 2 x the output tokens, i.e.
about twice the sampled request; at the default rate (1%) about 2% more engine work. Set the rate to
0 to turn sampling off.
"""

from __future__ import annotations

import asyncio
import contextlib
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


@dataclass(frozen=True)
class Timing:
    ttft: float
    e2e: float

    def get(self, phase: str) -> float:
        return self.ttft if phase == "ttft" else self.e2e


class OverheadSampler:
    """Measures patched vs unpatched latency on a sample of real requests.

    Args:
        engine: The engine the replays run on.
        metrics: Where samples are recorded.
        rate: Share of patched requests replayed (0 turns the sampler off).
        window: Pairs per stack the overhead gauge averages over.
        max_tokens: Cap on replayed output tokens.
        seed: Seeds the sampling decision (tests).
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
        self._rng = random.Random(seed)
        self._task: asyncio.Task[None] | None = None
        self._patched_first = True
        self._recent: dict[tuple[str, str], deque[tuple[Timing, Timing]]] = {}
        self._previous_prompt: list[int] | None = None

    def offer(self, request: EngineRequest, tenant: str, stack: str, output_tokens: int) -> bool:
        """Maybe replay ``request`` (a finished, patched one); returns whether it was sampled."""
        if request.layout is None or output_tokens < 1 or self.rate <= 0:
            return False
        if self._task is not None and not self._task.done():
            return False  # one pair at a time: bounded extra load
        if self._rng.random() >= self.rate:
            return False
        self._task = asyncio.create_task(self._measure(request, tenant, stack, min(output_tokens, self.max_tokens)))
        return True

    async def _measure(self, request: EngineRequest, tenant: str, stack: str, n_tokens: int) -> None:
        previous, self._previous_prompt = self._previous_prompt, request.prompt_token_ids
        if previous is None:
            return
        salt = f"shadow-{uuid.uuid4().hex}"
        sampling = SamplingSpec(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
        patched = replace(request, request_id="", sampling=sampling, cache_salt=salt)
        bare = replace(patched, layout=None)
        one_token = SamplingSpec(max_tokens=1, temperature=0.0)
        try:
            for variant in (patched, bare):
                await self._time(replace(variant, prompt_token_ids=previous, sampling=one_token))
            order = (patched, bare) if self._patched_first else (bare, patched)
            self._patched_first = not self._patched_first
            timings = {id(r): await self._time(r) for r in order}
        except Exception:  # noqa: BLE001 - a failed replay only loses a sample
            log.debug("overhead replay failed", exc_info=True)
            return
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

    async def close(self) -> None:
        """Cancel a replay in progress (shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
