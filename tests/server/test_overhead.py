"""The overhead sampler's scheduling over a fake engine: fairness across stacks, bounded pending
samples, rate 0, failing replays, shutdown. No wall clock: only which replays ran, in which order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest

from patches.stack import Layout
from server.engine import EngineChunk, EngineRequest, SamplingSpec
from server.metrics import Metrics
from server.overhead import OverheadSampler
from tests.support import FakeEngine

N_TOKENS = 3  # replays generate this many tokens; warm-ups one


class _Rows:
    """Stands in for a stack's layout: FakeEngine only takes its length."""

    def __len__(self) -> int:
        return 4


ROWS = cast(Layout, _Rows())


def request(prompt: list[int]) -> EngineRequest:
    return EngineRequest(request_id="r", prompt_token_ids=prompt, layout=ROWS, sampling=SamplingSpec(), cache_salt="s")


class ScriptedEngine(FakeEngine):
    """A FakeEngine that runs ``on_generate`` (traffic arriving meanwhile) as each replay starts, and
    fails the full-length replays of ``failing`` prompts."""

    def __init__(self) -> None:
        super().__init__()
        self.on_generate: Callable[[EngineRequest], object] | None = None
        self.failing: set[tuple[int, ...]] = set()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        if self.on_generate is not None:
            self.on_generate(request)
        if request.sampling.max_tokens > 1 and tuple(request.prompt_token_ids) in self.failing:
            raise RuntimeError("replay failed")
        async for chunk in super().generate(request):
            yield chunk


class HangingEngine(FakeEngine):
    """A FakeEngine that takes requests and never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        self.requests.append(request)
        self.started.set()
        await asyncio.Event().wait()
        for chunk in ():  # pragma: no cover - an async generator that never yields
            yield chunk


def measured(engine: FakeEngine) -> list[int]:
    """First prompt token of each measured pair, in order (stacks below use distinct first tokens)."""
    replays = [r.prompt_token_ids[0] for r in engine.requests if r.sampling.max_tokens > 1]
    assert replays[::2] == replays[1::2]  # patched and bare replay of the same prompt, back to back
    return replays[::2]


def samples(metrics: Metrics, stack: str) -> float:
    return metrics.overhead_samples.labels("t", stack)._value.get()


def make(engine: FakeEngine, rate: float = 1.0) -> tuple[OverheadSampler, Metrics]:
    metrics = Metrics()
    return OverheadSampler(engine, metrics, rate=rate, seed=0), metrics


async def prime(sampler: OverheadSampler) -> None:
    """The very first sample only records its prompt: spend it on a stack the tests ignore."""
    assert sampler.offer(request([0]), "t", "zero", N_TOKENS)
    await sampler.join()


def test_strictly_alternating_stacks_are_both_measured() -> None:
    """A is offered while the sampler is idle, B while A's pair replays. The old design (one pair at
    a time, offers skipped while busy) measured A every round and B never; now B waits its turn."""
    engine = FakeEngine()
    sampler, metrics = make(engine)

    async def run() -> None:
        for i in range(5):
            assert sampler.offer(request([10 + i]), "t", "A", N_TOKENS)
            assert sampler.offer(request([20 + i]), "t", "B", N_TOKENS)  # the worker is busy with A
            await sampler.join()

    asyncio.run(run())
    assert samples(metrics, "A") == 4  # the first sample of all only records its prompt
    assert samples(metrics, "B") == 5
    assert measured(engine) == [20, 11, 21, 12, 22, 13, 23, 14, 24]


def test_least_recently_measured_stack_goes_first() -> None:
    engine = FakeEngine()
    sampler, _ = make(engine)

    async def run() -> None:
        await prime(sampler)
        sampler.offer(request([10]), "t", "A", N_TOKENS)
        sampler.offer(request([20]), "t", "B", N_TOKENS)
        await sampler.join()  # never measured: in the order they became pending
        sampler.offer(request([21]), "t", "B", N_TOKENS)
        sampler.offer(request([11]), "t", "A", N_TOKENS)
        await sampler.join()  # A was measured longer ago than B, though B has waited longer

    asyncio.run(run())
    assert measured(engine) == [10, 20, 11, 21]


def test_a_hot_stack_does_not_crowd_out_a_quiet_one() -> None:
    """A is offered as every replay starts (four times per pair), B twice: B is not crowded out."""
    engine = ScriptedEngine()
    sampler, metrics = make(engine)
    offers = iter(range(100, 200))
    seen_pending: list[int] = []

    def traffic(replay: EngineRequest) -> None:
        n = next(offers)
        if n >= 120:
            return  # traffic stops; the worker drains what is pending
        sampler.offer(request([n]), "t", "A", N_TOKENS)
        if n in (101, 110):
            sampler.offer(request([n + 100]), "t", "B", N_TOKENS)
        seen_pending.append(sampler.pending)

    async def run() -> None:
        await prime(sampler)
        engine.on_generate = traffic
        sampler.offer(request([99]), "t", "A", N_TOKENS)
        await sampler.join()

    asyncio.run(run())
    assert max(seen_pending) == 2  # one per stack, however many offers
    # Each pair runs during four offers of A; B arrives during the 1st and the 3rd pair and is measured
    # right after it (measured less recently than A); A's replays are always its newest sample.
    assert measured(engine) == [99, 201, 107, 210, 115, 119]
    assert samples(metrics, "A") == 4
    assert samples(metrics, "B") == 2
    assert sampler.pending == 0


def test_pending_samples_are_one_per_stack_and_the_newest_wins() -> None:
    engine = FakeEngine()
    sampler, metrics = make(engine)

    async def run() -> int:
        await prime(sampler)
        for i in range(300):  # no await: the worker cannot run meanwhile
            stack = "ABC"[i % 3]
            assert sampler.offer(request([10 * (1 + i % 3), i]), "t", stack, N_TOKENS)
        pending = sampler.pending
        await sampler.join()
        return pending

    assert asyncio.run(run()) == 3
    assert measured(engine) == [10, 20, 30]
    newest = [r.prompt_token_ids for r in engine.requests if r.sampling.max_tokens > 1][::2]
    assert newest == [[10, 297], [20, 298], [30, 299]]
    assert [samples(metrics, s) for s in "ABC"] == [1, 1, 1]


def test_rate_zero_samples_nothing() -> None:
    engine = FakeEngine()
    sampler, metrics = make(engine, rate=0.0)

    async def run() -> None:
        for i in range(20):
            assert not sampler.offer(request([i]), "t", "A", N_TOKENS)
        await sampler.join()

    asyncio.run(run())
    assert sampler.pending == 0 and sampler._task is None
    assert engine.requests == []
    assert samples(metrics, "A") == 0


def test_unpatched_or_empty_requests_are_not_sampled() -> None:
    sampler, _ = make(FakeEngine())
    bare = EngineRequest(request_id="r", prompt_token_ids=[1], layout=None, sampling=SamplingSpec())
    assert not sampler.offer(bare, "t", "none", N_TOKENS)
    assert not sampler.offer(request([1]), "t", "A", 0)
    assert sampler.pending == 0


def test_a_failing_replay_is_logged_and_counted_and_the_worker_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine()
    engine.failing.add((10,))
    sampler, metrics = make(engine)

    async def run() -> None:
        await prime(sampler)
        sampler.offer(request([10]), "t", "A", N_TOKENS)
        sampler.offer(request([20]), "t", "B", N_TOKENS)
        await sampler.join()
        sampler.offer(request([11]), "t", "A", N_TOKENS)  # a new worker after the first drained
        await sampler.join()

    with caplog.at_level(logging.WARNING, logger="server.overhead"):
        asyncio.run(run())
    assert sampler.failures == 1
    assert [samples(metrics, s) for s in "AB"] == [1, 1]
    assert measured(engine) == [20, 11]  # A's failed pair is not in the list: its first replay raised
    (warning,) = [r for r in caplog.records if r.name == "server.overhead"]
    assert warning.levelno == logging.WARNING and "'A'" in warning.getMessage() and warning.exc_info


def test_close_cancels_the_replay_in_progress_and_drops_pending_samples() -> None:
    engine = HangingEngine()
    sampler, metrics = make(engine)

    async def run() -> None:
        await prime(sampler)  # records a prompt only: no engine call
        sampler.offer(request([10]), "t", "A", N_TOKENS)
        sampler.offer(request([20]), "t", "B", N_TOKENS)
        await engine.started.wait()
        task = sampler._task
        await sampler.close()
        assert task is not None and task.cancelled()
        assert sampler.pending == 0
        assert not sampler.offer(request([30]), "t", "C", N_TOKENS)  # closed: nothing more is sampled
        await sampler.join()

    asyncio.run(run())
    assert len(engine.requests) == 1  # A's first warm-up, never answered
    assert sampler.failures == 0
    assert [samples(metrics, s) for s in "ABC"] == [0, 0, 0]
