"""``/metrics`` over the fake engine: every patchserve family, its labels, and what moves them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from patches.errors import PatchRejected
from server.engine import EngineRequest, SamplingSpec
from server.metrics import OVERFLOW_STACK, Metrics
from server.overhead import OverheadSampler, Timing
from tests.server.test_api import CHAT, post_chat
from tests.support import FakeEngine

TS = ("tenant", "stack")
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "patchserve_requests": ("counter", (*TS, "endpoint", "status")),
    "patchserve_requests_in_flight": ("gauge", ()),
    "patchserve_time_to_first_token_seconds": ("histogram", TS),
    "patchserve_e2e_request_latency_seconds": ("histogram", TS),
    "patchserve_inter_token_latency_seconds": ("histogram", TS),
    "patchserve_prompt_tokens": ("counter", TS),
    "patchserve_patch_tokens": ("counter", TS),
    "patchserve_patch_cached_tokens": ("counter", TS),
    "patchserve_generation_tokens": ("counter", TS),
    "patchserve_completions": ("counter", TS),
    "patchserve_refusals": ("counter", TS),
    "patchserve_patch_completions": ("counter", ("patch", "version")),
    "patchserve_patch_refusals": ("counter", ("patch", "version")),
    "patchserve_overhead_samples": ("counter", TS),
    "patchserve_overhead_patched_seconds": ("counter", (*TS, "phase")),
    "patchserve_overhead_baseline_seconds": ("counter", (*TS, "phase")),
    "patchserve_latency_overhead_ratio": ("gauge", (*TS, "phase")),
    "patchserve_patch_info": ("gauge", ("patch", "version", "sha256", "signer")),
    "patchserve_patches_loaded": ("gauge", ()),
    "patchserve_patch_load_failures": ("counter", ("reason",)),
    "patchserve_patch_swaps": ("counter", ("patch",)),
    "patchserve_patch_swap_seconds": ("histogram", ()),
}
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created", "_info")


def scrape(http: TestClient) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(response.text)
    }


def value(families: dict, sample: str, **labels: str) -> float:
    """The sample ``sample`` with exactly ``labels`` (0 when absent)."""
    for samples in families.values():
        for name, got, v in samples:
            if name == sample and got == labels:
                return v
    return 0.0


def delta(http: TestClient, act: Callable[[], object], *probes: tuple[str, dict[str, str]]) -> list[float]:
    before = scrape(http)
    act()
    after = scrape(http)
    return [value(after, name, **labels) - value(before, name, **labels) for name, labels in probes]


def test_every_family_is_exported_with_its_type_and_labels(client: tuple[TestClient, FakeEngine]) -> None:
    http, engine = client
    post_chat(http, "locked")
    sampler = http.app.state.sampler
    sampler.record("locked", "alpha@1", Timing(0.1, 1.0), Timing(0.1, 0.9))  # so the overhead series exist
    families = scrape(http)
    types = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        types[family.name] = family.type
    for name, (kind, labels) in FAMILIES.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}"
        samples = families[name]
        assert samples, name
        for sample_name, got, _ in samples:
            assert sample_name.startswith(name)
            assert set(got) - {"le"} == set(labels), (sample_name, got)
    assert not [name for name in families if name.endswith("_created")], "created series are switched off"
    assert any(name.startswith(("process_", "python_")) for name in families), "process metrics"


def test_a_patched_request_counts_latency_tokens_and_completions(client: tuple[TestClient, FakeEngine]) -> None:
    http, engine = client
    labels = {"tenant": "locked", "stack": "alpha@1"}
    engine.cached_tokens = 32
    try:
        got = delta(
            http,
            lambda: post_chat(http, "locked"),
            ("patchserve_requests_total", {**labels, "endpoint": "chat", "status": "200"}),
            ("patchserve_patch_tokens_total", labels),
            ("patchserve_patch_cached_tokens_total", labels),
            ("patchserve_generation_tokens_total", labels),
            ("patchserve_time_to_first_token_seconds_count", labels),
            ("patchserve_e2e_request_latency_seconds_count", labels),
            ("patchserve_inter_token_latency_seconds_count", labels),
            ("patchserve_completions_total", labels),
            ("patchserve_refusals_total", labels),
            ("patchserve_patch_completions_total", {"patch": "alpha", "version": "1"}),
        )
    finally:
        engine.cached_tokens = 0
    # 12 patch rows, of which the engine reports 32 cached tokens → all 12 served from the cache
    assert got == [1, 12, 12, 4, 1, 1, 3, 1, 0, 1]
    prompt = delta(http, lambda: post_chat(http, "locked"), ("patchserve_prompt_tokens_total", labels))[0]
    assert prompt == len(engine.requests[-1].prompt_token_ids) > 0
    assert value(scrape(http), "patchserve_requests_in_flight") == 0


def test_refusals_are_classified_per_stack_and_per_patch_version(client: tuple[TestClient, FakeEngine]) -> None:
    http, engine = client
    stacked = {"tenant": "stacked", "stack": "alpha@1+beta@1"}
    engine.reply = "I can't help with that request."
    body = {**CHAT, "max_tokens": 8, "n": 2}
    try:
        got = delta(
            http,
            lambda: post_chat(http, "stacked", body),
            ("patchserve_completions_total", stacked),
            ("patchserve_refusals_total", stacked),
            ("patchserve_patch_refusals_total", {"patch": "beta", "version": "1"}),
            ("patchserve_patch_completions_total", {"patch": "alpha", "version": "1"}),
        )
    finally:
        engine.reply = None
    assert got == [2, 2, 2, 2]
    bare = {"tenant": "open", "stack": "none"}
    assert delta(
        http,
        lambda: post_chat(http, "open"),
        ("patchserve_completions_total", bare),
        ("patchserve_refusals_total", bare),
    ) == [1, 0]


def test_streams_are_measured_like_responses(client: tuple[TestClient, FakeEngine]) -> None:
    http, _ = client
    labels = {"tenant": "locked", "stack": "alpha@1"}
    got = delta(
        http,
        lambda: post_chat(http, "locked", {**CHAT, "stream": True}).text,
        ("patchserve_requests_total", {**labels, "endpoint": "chat", "status": "200"}),
        ("patchserve_e2e_request_latency_seconds_count", labels),
        ("patchserve_generation_tokens_total", labels),
    )
    assert got == [1, 1, 4]


def test_rejected_requests_never_put_client_input_into_labels(client: tuple[TestClient, FakeEngine]) -> None:
    http, _ = client
    anon = {"tenant": "-", "stack": "-", "endpoint": "chat"}
    got = delta(
        http,
        lambda: [post_chat(http, f"intruder-{i}") for i in range(3)],
        ("patchserve_requests_total", {**anon, "status": "401"}),
    )
    assert got == [3]
    got = delta(
        http,
        lambda: post_chat(http, "locked", **{"X-Patch-Stack": "beta"}),  # not allowed for this tenant
        ("patchserve_requests_total", {"tenant": "locked", "stack": "-", "endpoint": "chat", "status": "403"}),
    )
    assert got == [1]
    text = http.get("/metrics").text
    assert "intruder" not in text


def test_completions_endpoint_is_counted_separately(client: tuple[TestClient, FakeEngine]) -> None:
    http, _ = client
    labels = {"tenant": "open", "stack": "none", "endpoint": "completions", "status": "200"}
    got = delta(
        http,
        lambda: http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Tenant-Id": "open"}),
        ("patchserve_requests_total", labels),
    )
    assert got == [1]


def test_loaded_patches_failures_and_swaps(client: tuple[TestClient, FakeEngine]) -> None:
    http, _ = client
    families = scrape(http)
    info = {(s[1]["patch"], s[1]["version"]): s[1] for s in families["patchserve_patch_info"]}
    entries = {(e.patch.name, str(e.patch.version)): e.patch for e in http.app.state.registry.entries()}
    assert set(info) == set(entries) == {("alpha", "1"), ("beta", "1"), ("beta", "2")}
    for key, patch in entries.items():
        assert info[key]["sha256"] == patch.digest.removeprefix("sha256:")
    assert value(families, "patchserve_patches_loaded") == 3
    assert value(families, "patchserve_patch_load_failures_total", reason="bad_format") >= 1  # corrupt.safetensors
    assert value(families, "patchserve_patch_swaps_total", patch="beta") == 2
    assert value(families, "patchserve_patch_swap_seconds_count") == 3


def test_unload_refusal_and_removal_show_up(make_client: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    http, _ = make_client()
    registry = http.app.state.registry
    got = delta(
        http,
        lambda: pytest.raises(PatchRejected, registry.unload, "alpha", 1),  # pinned by 'locked'
        ("patchserve_patch_load_failures_total", {"reason": "in_use"}),
    )
    assert got == [1]
    registry.unload("beta", 2)
    assert ("beta", "2") not in {(s[1]["patch"], s[1]["version"]) for s in scrape(http)["patchserve_patch_info"]}


def test_stack_labels_are_bounded() -> None:
    metrics = Metrics(max_stacks=2)
    assert [metrics.stack_label(s) for s in ("a@1", "b@1", "a@1", "c@1", "d@1")] == [
        "a@1",
        "b@1",
        "a@1",
        OVERFLOW_STACK,
        OVERFLOW_STACK,
    ]


class TestOverheadSampler:
    @staticmethod
    def _request(engine_prefix: object, prompt: list[int]) -> EngineRequest:
        return EngineRequest(
            request_id="r", prompt_token_ids=prompt, layout=engine_prefix, sampling=SamplingSpec(), cache_salt="s"
        )

    def test_replays_with_and_without_the_patch_after_warming_the_cache(
        self, client: tuple[TestClient, FakeEngine]
    ) -> None:
        http, _ = client
        stack = http.app.state.resolver.resolve(http.app.state.resolver.config.get("locked"), None)
        engine = FakeEngine()
        metrics = Metrics()
        sampler = OverheadSampler(engine, metrics, rate=1.0, max_tokens=5, seed=0)

        async def run() -> list[bool]:
            offered = []
            for prompt in ([1, 2, 3], [4, 5, 6, 7]):
                offered.append(sampler.offer(self._request(stack.layout, prompt), "locked", "alpha@1", 9))
                await sampler._task
            return offered

        assert asyncio.run(run()) == [True, True]
        # the first sample only remembers its prompt; the second warms up on it, then replays both ways
        warm_p, warm_b, first, second = engine.requests
        assert warm_p.prompt_token_ids == warm_b.prompt_token_ids == [1, 2, 3]
        assert warm_p.layout is stack.layout and warm_b.layout is None
        assert warm_p.sampling.max_tokens == warm_b.sampling.max_tokens == 1
        assert {first.layout is None, second.layout is None} == {True, False}
        for replay in (first, second):
            assert replay.prompt_token_ids == [4, 5, 6, 7]
            assert replay.sampling.max_tokens == 5 and replay.sampling.ignore_eos and replay.sampling.temperature == 0
            assert replay.cache_salt == warm_p.cache_salt != "s"
            assert replay.request_id.startswith("shadow-")
        assert metrics.overhead_samples.labels("locked", "alpha@1")._value.get() == 1

    def test_bare_requests_and_busy_sampler_are_skipped(self) -> None:
        sampler = OverheadSampler(FakeEngine(), Metrics(), rate=1.0)
        assert not sampler.offer(self._request(None, [1]), "t", "none", 4)
        assert not OverheadSampler(FakeEngine(), Metrics(), rate=0.0).offer(self._request(object(), [1]), "t", "s", 4)

    def test_ratio_is_the_windowed_ratio_of_sums(self) -> None:
        metrics = Metrics()
        sampler = OverheadSampler(FakeEngine(), metrics, rate=0.0, window=2)
        ratio = metrics.overhead_ratio
        sampler.record("t", "s", Timing(0.2, 1.2), Timing(0.1, 1.0))
        assert ratio.labels("t", "s", "e2e")._value.get() == pytest.approx(0.2)
        assert ratio.labels("t", "s", "ttft")._value.get() == pytest.approx(1.0)
        sampler.record("t", "s", Timing(0.1, 1.0), Timing(0.1, 1.0))
        assert ratio.labels("t", "s", "e2e")._value.get() == pytest.approx(0.1)  # 2.2 / 2.0 - 1
        sampler.record("t", "s", Timing(0.1, 1.0), Timing(0.1, 1.0))  # the first pair leaves the window
        assert ratio.labels("t", "s", "e2e")._value.get() == pytest.approx(0.0)
        assert metrics.overhead_patched.labels("t", "s", "e2e")._value.get() == pytest.approx(3.2)


def test_user_metrics_ignore_shadow_replays(make_client: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    http, engine = make_client(overhead_sample_rate=1.0)
    labels = {"tenant": "locked", "stack": "alpha@1"}
    before = scrape(http)
    for _ in range(3):
        post_chat(http, "locked")
        deadline = time.monotonic() + 5
        while http.app.state.sampler._task is not None and not http.app.state.sampler._task.done():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    after = scrape(http)
    grew = lambda name: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert grew("patchserve_generation_tokens_total") == 12  # 3 x 4 tokens, none of the replays'
    assert grew("patchserve_completions_total") == 3
    assert grew("patchserve_overhead_samples_total") == 2  # the first sample only records its prompt
    assert len(engine.requests) == 3 + 2 * 4
    ratio = value(after, "patchserve_latency_overhead_ratio", **labels, phase="e2e")
    assert ratio > -1
