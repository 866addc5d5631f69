"""The server-overhead benchmark's pure parts: calls, engine settings, ratios, order, profiles (no engine)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from aiohttp import web

from bench import loadgen, report, server_overhead
from bench.server_overhead import (
    MEMORY_SHARE,
    MODES,
    SERVERS,
    config_differences,
    function_shares,
    make_call,
    markdown,
    order,
    overhead_rows,
    patchserve_root,
    targets,
    variant,
)
from bench.stats import Sample, Segment
from bench.variants import ENGINE, MODEL_ID, sampling, vllm_args
from bench.workload import Options


def seg(tokens_per_request: int, n: int, wall: float, e2e: float = 1.0) -> Segment:
    return Segment([Sample(e2e, e2e, tokens_per_request) for _ in range(n)], wall)


@pytest.mark.parametrize("mode", MODES)
def test_calls_of_both_servers_differ_only_in_the_tenant_header(mode: str) -> None:
    ours, theirs = make_call("bare", mode, "hi", 64), make_call("vllm_bare", mode, "hi", 64)
    assert ours.path == theirs.path == "/v1/chat/completions"
    assert ours.body == theirs.body
    assert ours.headers == {"X-Tenant-Id": "bench-bare"} and theirs.headers == {}
    body = ours.body
    assert isinstance(body, dict)
    assert body["model"] == MODEL_ID and body["max_tokens"] == 64 and body["ignore_eos"] is True
    assert body["temperature"] == 0 and body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["stream"] is (mode == "stream")
    assert ("stream_options" in body) is (mode == "stream")


def test_unknown_server_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown server"):
        make_call("lora", "stream", "hi", 8)


def test_non_streamed_sampling_has_no_stream_options() -> None:
    assert sampling(8, stream=False) == {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": False}
    assert sampling(8)["stream_options"] == {"include_usage": True}


def test_both_engines_get_the_same_arguments_and_memory_share(tmp_path: Path) -> None:
    args = vllm_args(tmp_path, Options(), None, MEMORY_SHARE)
    flags = dict(zip(args[::2], args[1::2], strict=False))  # the model and engine flags come first, each with a value
    env = patchserve_root(tmp_path, tmp_path, Options())
    for name, value in {**ENGINE, "gpu_memory_utilization": MEMORY_SHARE}.items():
        assert flags["--" + name.replace("_", "-")] == str(value)
        assert env[f"PATCHSERVE_{name.upper()}"] == str(value)
    assert MEMORY_SHARE == 0.12
    assert "--enforce-eager" in args and "--enforce-eager" not in vllm_args(tmp_path, Options(compiled=True), None)


def test_patchserve_engine_settings_are_what_the_server_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from server.settings import Settings

    for key, value in patchserve_root(tmp_path, tmp_path, Options()).items():
        monkeypatch.setenv(key, value)
    settings = Settings(dev_mode=True, allow_unsigned=True, patch_dir=tmp_path)
    assert settings.gpu_memory_utilization == MEMORY_SHARE
    assert (settings.dtype, settings.block_size, settings.max_model_len, settings.max_num_seqs) == (
        ENGINE["dtype"],
        ENGINE["block_size"],
        ENGINE["max_model_len"],
        ENGINE["max_num_seqs"],
    )


def test_order_rotates_and_each_server_leads_as_often_over_rounds() -> None:
    assert sorted(order(0, 1, 0)) == sorted(SERVERS)
    leaders = [order(r, c, m)[0] for r in range(4) for c in (1, 8, 32) for m in range(len(MODES))]
    assert leaders.count("bare") == leaders.count("vllm_bare")
    assert order(0, 8, 0) != order(1, 8, 0)


def test_overhead_rows_ratios_per_round_min_median() -> None:
    segments = {
        variant("bare", "stream"): {32: [seg(64, 10, 1.0), seg(64, 10, 2.0), seg(64, 10, 1.0)]},
        variant("vllm_bare", "stream"): {32: [seg(64, 10, 0.9), seg(64, 10, 1.0), seg(64, 10, 1.0)]},
        variant("bare", "nostream"): {8: [seg(64, 4, 1.0, e2e=2.0)]},
        variant("vllm_bare", "nostream"): {8: [seg(64, 4, 1.0, e2e=1.0)], 32: [seg(64, 4, 1.0)]},
    }
    cpu = {variant("bare", "stream"): {32: [3.0, 5.0]}, variant("vllm_bare", "stream"): {32: [2.0]}}
    rows = overhead_rows(segments, cpu)
    stream = rows["stream"][32]
    assert stream["per_round"] == pytest.approx([0.9, 0.5, 1.0])
    assert stream["min"] == pytest.approx(0.5) and stream["median"] == pytest.approx(0.9)
    assert stream["throughput_ratio"] == pytest.approx((1920 / 4.0) / (1920 / 2.9))  # pooled, not the mean
    assert stream["patchserve_api_cpu_ms_per_request"] == pytest.approx(4.0)
    assert stream["vllm_api_cpu_ms_per_request"] == pytest.approx(2.0)
    assert list(rows["nostream"]) == [8]  # a concurrency only one server has is no row
    assert rows["nostream"][8]["e2e_p50_ratio"] == pytest.approx(2.0)
    assert math.isnan(rows["nostream"][8]["patchserve_api_cpu_ms_per_request"])


def test_targets_check_the_highest_concurrency_of_each_mode() -> None:
    rows = {
        "nostream": {1: {"throughput_ratio": 0.5, "median": 0.5, "min": 0.5}, 32: _row(0.985)},
        "stream": {32: _row(0.95)},
    }
    lines = targets(rows)
    assert [(t["target"], t["met"]) for t in lines] == [
        ("server overhead (nostream), c=32", True),
        ("server overhead (stream), c=32", False),
    ]


def _row(ratio: float) -> dict[str, object]:
    return {"throughput_ratio": ratio, "median": ratio, "min": ratio - 0.01}


def test_markdown_and_the_bench_report_show_the_row() -> None:
    segments = {variant(s, m): {32: [seg(64, 4, 1.0)]} for s in SERVERS for m in MODES}
    rows = overhead_rows(segments)
    table = markdown(rows)
    assert "| nostream | 32 | **1.000** | 1.000 |" in table and "| stream | 32 |" in table
    assert table.count("\n") == 3  # header, rule, two rows
    results = {
        "summary": {},
        "figures": {},
        "baselines": {},
        "engine": "eager",
        "machine": {"cpus": 2, "ram_gb": 23.5},
        "options": {"max_tokens": 64, "repeats": 3},
        "duration_s": 60.0,
        "server_overhead": {"rows": rows, "targets": targets(rows)},
    }
    results["targets"] = report.targets(results)
    assert [t["target"] for t in results["targets"]] == [
        "server overhead (nostream), c=32",
        "server overhead (stream), c=32",
    ]
    text = report.markdown(results)
    assert "Server overhead: patchserve's bare tenant vs vLLM's own OpenAI server" in text
    assert "| server overhead (stream), c=32 | 1.000 | >= 0.98 | yes |" in text


def test_function_shares_drop_line_numbers_and_filter_own_code() -> None:
    raw = "\n".join(
        [
            "thread (1);run (asyncio/events.py:80);_run (server/serving.py:10);dumps (json/encoder.py:5) 6",
            "thread (1);run (asyncio/events.py:81);_run (server/serving.py:12) 3",
            "thread (1);run (asyncio/events.py:80);step (vllm/engine.py:3) 1",
            "garbage",
        ]
    )
    everything, total = function_shares(raw)
    assert total == 10
    assert everything[0] == ("run (asyncio/events.py)", 1.0)
    own, _ = function_shares(raw, "server/")
    assert own == [("_run (server/serving.py)", pytest.approx(0.9))]


def test_config_differences_name_what_differs() -> None:
    ours = "model='m', dtype=torch.bfloat16, max_seq_len=2048, enforce_eager=True, seed=0"
    assert config_differences(ours, ours) == []
    theirs = ours.replace("enforce_eager=True", "enforce_eager=False")
    assert config_differences(ours, theirs) == ["enforce_eager=False", "enforce_eager=True"]


async def _serve(handler: web.RequestHandler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def test_non_streamed_calls_go_through_the_loadgen_and_count_usage_tokens() -> None:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if body["stream"]:
            frames = [
                {"choices": [{"delta": {"content": "a"}}]},
                {"choices": [], "usage": {"completion_tokens": 2}},
            ]
            text = "".join(f"data: {json.dumps(f)}\n\n" for f in frames) + "data: [DONE]\n\n"
            return web.Response(text=text, content_type="text/event-stream")
        answer = {"choices": [{"message": {"content": "ab"}}], "usage": {"completion_tokens": 7}}
        return web.json_response(answer)

    async def scenario() -> tuple[Segment, Segment]:
        runner, url = await _serve(handler)
        try:
            plain = await loadgen.closed_loop(url, [make_call("vllm_bare", "nostream", "hi", 7)] * 3, 2)
            streamed = await loadgen.closed_loop(url, [make_call("bare", "stream", "hi", 2)], 1)
            return plain, streamed
        finally:
            await runner.cleanup()

    plain, streamed = asyncio.run(scenario())
    assert plain.tokens == 21 and all(s.ttft == s.e2e and s.gaps == [] for s in plain.samples)
    assert streamed.tokens == 2


def test_non_streamed_call_failure_is_reported() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    async def scenario() -> None:
        runner, url = await _serve(handler)
        try:
            await loadgen.closed_loop(url, [make_call("bare", "nostream", "hi", 4)], 1)
        finally:
            await runner.cleanup()

    with pytest.raises(loadgen.RequestFailed, match="HTTP 503"):
        asyncio.run(scenario())


def test_default_run_is_at_least_four_rounds_at_three_concurrencies() -> None:
    opts = server_overhead.options(quick=False)
    assert opts.repeats >= 4 and opts.concurrencies == [1, 8, 32] and opts.max_tokens == 64
