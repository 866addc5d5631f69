"""The per-request path stays lean without changing what it answers: non-streamed requests get their
generation whole (vLLM's FINAL_ONLY) and are measured from the engine's own timing (streams and overhead
replays still go token by token); a stack served before is admitted without a worker thread; the
per-request dependencies run on the event loop."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import server.serving as serving
from patches.errors import Forbidden
from server import deps
from server.engine import ChunkTiming, EngineChunk, EngineConfig, EngineRequest, SamplingSpec, VllmEngine, _timing
from server.metrics import Metrics, RequestTracker
from server.overhead import OverheadSampler
from server.serving import CompletionService
from server.tenancy import Caller, NotComposed, TenantResolver
from tests.server.test_api import CHAT, post_chat
from tests.support import FakeEngine


def test_a_non_streamed_request_asks_the_engine_for_the_finished_generation_only(
    client: tuple[TestClient, FakeEngine],
) -> None:
    http, engine = client
    assert post_chat(http).status_code == 200
    assert engine.requests[-1].stream is False
    streamed = http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Tenant-Id": "open"})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert engine.requests[-1].stream is True
    text = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Tenant-Id": "open"})
    assert text.status_code == 200 and engine.requests[-1].stream is False


class _FakeLLM:
    """vLLM's ``AsyncLLM.generate`` as the adapter sees it: one finished output, or deltas."""

    def __init__(self) -> None:
        self.params: list[Any] = []

    async def generate(self, prompt: dict, params: Any, request_id: str) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        self.params.append(params)
        stats = SimpleNamespace(first_token_latency=0.05, first_token_ts=100.0, last_token_ts=100.3)
        if params.output_kind == RequestOutputKind.FINAL_ONLY:
            choice = SimpleNamespace(index=0, text=" a b c", token_ids=[1, 2, 3], finish_reason="length", logprobs=None)
            yield SimpleNamespace(num_cached_tokens=32, outputs=[choice], metrics=stats)
            return
        for i, word in enumerate((" a", " b", " c")):
            finish = "length" if i == 2 else None
            choice = SimpleNamespace(index=0, text=word, token_ids=[i + 1], finish_reason=finish, logprobs=None)
            yield SimpleNamespace(num_cached_tokens=32, outputs=[choice], metrics=stats)


@pytest.mark.parametrize("stream", [False, True])
def test_the_vllm_adapter_picks_the_output_kind_and_times_a_whole_generation(tmp_path: Path, stream: bool) -> None:
    from vllm.sampling_params import RequestOutputKind

    llm = _FakeLLM()
    engine = VllmEngine(llm, EngineConfig(model_dir=tmp_path, served_model_name="m"))  # type: ignore[arg-type]
    request = EngineRequest("r", [1, 2], None, SamplingSpec(max_tokens=3), stream=stream)

    async def collect() -> list[EngineChunk]:
        return [chunk async for chunk in engine.generate(request)]

    chunks = asyncio.run(collect())
    kind = llm.params[0].output_kind
    assert kind == (RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
    assert "".join(c.text for c in chunks) == " a b c" and sum(c.n_tokens for c in chunks) == 3
    assert chunks[-1].finish_reason == "length" and chunks[-1].cached_tokens == 32
    if stream:
        assert len(chunks) == 3 and all(c.timing is None for c in chunks)
    else:
        assert len(chunks) == 1
        assert chunks[0].timing == ChunkTiming(first_token=pytest.approx(0.05), decode=pytest.approx(0.3))


def test_timing_needs_the_engine_stats_of_a_started_generation() -> None:
    assert _timing(None) is None
    assert _timing(SimpleNamespace(first_token_latency=0.0, first_token_ts=0.0, last_token_ts=0.0)) is None
    timing = _timing(SimpleNamespace(first_token_latency=0.2, first_token_ts=5.0, last_token_ts=5.5))
    assert timing == ChunkTiming(first_token=pytest.approx(0.2), decode=pytest.approx(0.5))


def _histogram(metrics: Metrics, name: str) -> tuple[float, float]:
    """(sum, count) of one of the tracker's histograms for tenant ``t``, stack ``s``."""
    samples = {s.name: s.value for s in getattr(metrics, name).labels("t", "s").collect()[0].samples}
    return samples[f"patchserve_{_FAMILY[name]}_sum"], samples[f"patchserve_{_FAMILY[name]}_count"]


_FAMILY = {"ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds"}


def test_a_whole_generation_is_measured_by_the_engine_timing() -> None:
    metrics = Metrics()
    tracker = RequestTracker.begin(metrics, "t", "s", prompt_tokens=5, patch_len=0)
    tracker.tokens(5, 0, ChunkTiming(first_token=0.25, decode=0.4))
    assert _histogram(metrics, "ttft") == (pytest.approx(0.25), 1)
    assert _histogram(metrics, "itl") == (pytest.approx(0.4), 4)  # the same sum and count as five deltas
    assert metrics.generation_tokens.labels("t", "s")._value.get() == 5


def test_token_by_token_measurement_is_unchanged() -> None:
    metrics = Metrics()
    tracker = RequestTracker.begin(metrics, "t", "s", prompt_tokens=5, patch_len=0)
    tracker.tokens(1, 0)
    tracker.tokens(2, 0)
    tracker.tokens(0, 0)  # no tokens: nothing observed
    ttft_sum, ttft_count = _histogram(metrics, "ttft")
    assert ttft_count == 1 and ttft_sum >= 0
    assert _histogram(metrics, "itl")[1] == 2
    assert metrics.generation_tokens.labels("t", "s")._value.get() == 3


def test_overhead_replays_of_a_non_streamed_request_are_streamed(client: tuple[TestClient, FakeEngine]) -> None:
    http, _ = client
    stack = http.app.state.resolver.resolve(http.app.state.resolver.config.get("locked"), None)
    engine = FakeEngine()
    sampler = OverheadSampler(engine, Metrics(), rate=1.0, max_tokens=5, seed=0)

    async def run() -> None:
        for prompt in ([1, 2, 3], [4, 5, 6, 7]):
            request = EngineRequest("r", prompt, stack.layout, SamplingSpec(), cache_salt="s", stream=False)
            assert sampler.offer(request, "locked", "alpha@1", 9)
            await sampler._task

    asyncio.run(run())
    assert len(engine.requests) == 4 and all(r.stream for r in engine.requests)


def _fresh_resolver(http: TestClient) -> TenantResolver:
    """A resolver over the app's tenants and patches with nothing composed yet."""
    state = http.app.state
    return TenantResolver(
        state.resolver.config, state.registry, separator_id=state.encoder.separator_id, dtype=torch.bfloat16
    )


def test_a_stack_resolves_without_blocking_once_its_layout_is_composed(client: tuple[TestClient, FakeEngine]) -> None:
    http, _ = client
    resolver = _fresh_resolver(http)
    tenant = resolver.config.get("stacked")
    assert tenant is not None
    with pytest.raises(NotComposed) as pending:
        resolver.select(tenant, None, None, "base", compose=False)
    assert pending.value.stack.layout is None and pending.value.stack.applied != "none"
    first = resolver.compose(pending.value.stack)  # finishes the admitted stack: no second parse or admission
    again = resolver.select(tenant, None, None, "base", compose=False)
    assert again.layout is first.layout and again.layout is not None
    assert (again.cache_salt, again.applied) == (first.cache_salt, first.applied)
    with pytest.raises(Forbidden):  # a refusal is a refusal before any layout question
        resolver.select(tenant, "gamma", None, "base", compose=False)


def test_admission_uses_a_worker_thread_only_to_compose(
    client: tuple[TestClient, FakeEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    http, engine = client
    state = http.app.state
    service = CompletionService(engine, state.encoder, "base", resolver=_fresh_resolver(http))
    threads: list[object] = []

    async def counting_to_thread(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        threads.append(func)
        return func(*args, **kwargs)

    monkeypatch.setattr(serving.asyncio, "to_thread", counting_to_thread)
    tenant = state.resolver.config.get("stacked")

    async def admit_twice() -> tuple[Any, Any]:
        caller = Caller(tenant, None)
        return await service.admit(caller, None), await service.admit(caller, None)

    first, second = asyncio.run(admit_twice())
    assert len(threads) == 1  # the first admission composed the layout; the second found it
    assert getattr(threads[0], "__name__", "") == "compose"  # only the composing runs off the loop, not select
    assert first.layout is second.layout and first.applied == second.applied == "alpha@1+beta@1"


def test_per_request_dependencies_run_on_the_event_loop() -> None:
    for dependency in (deps.get_resolver, deps.get_service, deps.get_caller):
        assert inspect.iscoroutinefunction(dependency), dependency.__name__
