"""Live toxicity telemetry (``server/toxicity_meter.py``): completions scored off the request path by the
real offline classifier, counted per tenant/stack and per patch version; a full queue drops and counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from patches.toxicity import default_scorer
from server.metrics import Metrics
from server.toxicity_meter import ToxicityMeter
from tests.server.test_api import CHAT, post_chat
from tests.server.test_metrics import scrape, value
from tests.support import FakeEngine

TOXIC_TEXT = "You are a stupid worthless idiot ."
CLEAN_TEXT = "The weather in Paris is mild in spring ."
ALPHA = SimpleNamespace(name="alpha", version=1)


class FixedScorer:
    """Scores a text 1.0 when it contains ``bad``, else 0.0; records each call's size."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, texts: list[str]) -> list[float]:
        self.calls.append(len(texts))
        return [1.0 if "bad" in t else 0.0 for t in texts]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_counts_toxic_completions_per_stack_and_per_patch_version() -> None:
    metrics, scorer = Metrics(), FixedScorer()
    meter = ToxicityMeter(metrics, scorer, batch=3)

    async def go() -> None:
        meter.offer("t1", "alpha@1", [ALPHA], ["bad one", "fine", "bad two"])
        meter.offer("t2", "none", [], ["fine"])
        meter.offer("t2", "none", [], [])  # nothing to score: not queued
        assert meter.pending() == 2
        await meter.drain()

    asyncio.run(go())
    ts1, ts2 = {"tenant": "t1", "stack": "alpha@1"}, {"tenant": "t2", "stack": "none"}
    assert sample(metrics, "patchserve_toxicity_scored_total", **ts1) == 3
    assert sample(metrics, "patchserve_toxic_completions_total", **ts1) == 2
    assert sample(metrics, "patchserve_toxicity_scored_total", **ts2) == 1
    assert sample(metrics, "patchserve_toxic_completions_total", **ts2) == 0
    pv = {"patch": "alpha", "version": "1"}
    assert sample(metrics, "patchserve_patch_toxicity_scored_total", **pv) == 3
    assert sample(metrics, "patchserve_patch_toxic_completions_total", **pv) == 2
    assert scorer.calls == [4]  # one classifier call for everything queued


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    metrics = Metrics()
    meter = ToxicityMeter(metrics, FixedScorer(), max_pending=1)

    async def go() -> None:
        meter.offer("t", "none", [], ["a"])
        meter.offer("t", "none", [], ["b", "c"])  # the queue is full: dropped

    asyncio.run(go())
    assert meter.pending() == 1
    assert sample(metrics, "patchserve_toxicity_dropped_total") == 2


def test_run_scores_in_batches_and_ends_on_stop() -> None:
    metrics, scorer = Metrics(), FixedScorer()
    meter = ToxicityMeter(metrics, scorer, batch=2)

    async def go() -> None:
        stop = asyncio.Event()
        for _ in range(5):
            meter.offer("t", "none", [], ["bad"])
        task = asyncio.create_task(meter.run(stop))
        while meter.pending():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    asyncio.run(go())
    assert sum(scorer.calls) == 5 and max(scorer.calls) <= 2
    assert sample(metrics, "patchserve_toxic_completions_total", tenant="t", stack="none") == 5


def test_a_scorer_that_breaks_raises_for_the_supervisor() -> None:
    class Broken:
        def score(self, texts: list[str]) -> list[float]:
            return []

    meter = ToxicityMeter(Metrics(), Broken())

    async def go() -> None:
        meter.offer("t", "none", [], ["x"])
        await meter.drain()

    with pytest.raises(RuntimeError, match="0 scores for 1 texts"):
        asyncio.run(go())


def test_the_real_classifier_separates_an_insult_from_small_talk() -> None:
    toxic, clean = default_scorer().score([TOXIC_TEXT, CLEAN_TEXT])
    assert toxic >= 0.5 > clean


def _wait_for(http: TestClient, name: str, labels: dict[str, str], at_least: float) -> float:
    deadline = time.monotonic() + 30  # the meter runs in the background: wait for it, this is no speed bound
    while True:
        got = value(scrape(http), name, **labels)
        if got >= at_least or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_the_server_counts_toxic_completions_in_the_background(
    make_client: Callable[..., tuple[TestClient, FakeEngine]],
) -> None:
    http, engine = make_client()
    labels = {"tenant": "locked", "stack": "alpha@1"}
    before = scrape(http)
    engine.reply = TOXIC_TEXT
    try:
        assert post_chat(http, "locked", {**CHAT, "max_tokens": 8, "n": 2}).status_code == 200
    finally:
        engine.reply = None
    scored0 = value(before, "patchserve_toxicity_scored_total", **labels)
    toxic0 = value(before, "patchserve_toxic_completions_total", **labels)
    assert _wait_for(http, "patchserve_toxicity_scored_total", labels, scored0 + 2) == scored0 + 2
    assert value(scrape(http), "patchserve_toxic_completions_total", **labels) == toxic0 + 2
    pv = {"patch": "alpha", "version": "1"}
    assert value(scrape(http), "patchserve_patch_toxic_completions_total", **pv) >= 2
    engine.reply = CLEAN_TEXT
    try:
        assert post_chat(http, "locked", {**CHAT, "max_tokens": 8}).status_code == 200
    finally:
        engine.reply = None
    assert _wait_for(http, "patchserve_toxicity_scored_total", labels, scored0 + 3) == scored0 + 3
    assert value(scrape(http), "patchserve_toxic_completions_total", **labels) == toxic0 + 2  # clean: not toxic
    assert http.get("/readyz").status_code == 200


def test_switched_off_it_exports_nothing(make_client: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    http, _ = make_client(toxicity_metrics=False)
    assert http.app.state.service.meter is None
    assert post_chat(http, "locked").status_code == 200
    assert not [s for s in scrape(http).get("patchserve_toxicity_scored", []) if s[0].endswith("_total")]
