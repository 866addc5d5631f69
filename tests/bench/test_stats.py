"""Pure helpers of the overhead benchmark: statistics, the summary.json shape, the report (no clock)."""

from __future__ import annotations

import json
import math

import pytest

from bench import report
from bench.segments import rotated
from bench.stats import (
    SUMMARY_VARIANTS,
    Sample,
    Segment,
    build_summary,
    jsonable,
    percentile,
    point_figures,
    ratios,
    segment_throughput_ratios,
    throughput_overhead,
)
from bench.workload import PromptBook, user_prompt


def segment(ttft: float, e2e: float, tokens: int, n: int, wall: float) -> Segment:
    gap = (e2e - ttft) / (tokens - 1)
    return Segment([Sample(ttft, e2e, tokens, [gap] * (tokens - 1)) for _ in range(n)], wall)


def test_percentile_interpolates_between_ranks():
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert percentile([5], 0.99) == 5
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 0.9) == 10
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_point_figures_pool_segments():
    figures = point_figures([segment(0.1, 1.1, 11, 4, 2.0), segment(0.1, 1.1, 11, 4, 2.0)])
    assert figures["requests"] == 8
    assert figures["throughput_tok_s"] == pytest.approx(88 / 4.0)
    assert figures["ttft_p50_ms"] == pytest.approx(100)
    assert figures["itl_p50_ms"] == pytest.approx(100)
    assert figures["tpot_p50_ms"] == pytest.approx(100)
    assert figures["e2e_p99_ms"] == pytest.approx(1100)


def test_ratios_and_overhead():
    base = point_figures([segment(0.1, 1.1, 11, 4, 2.0)])
    slower = point_figures([segment(0.2, 2.2, 11, 4, 4.0)])
    r = ratios(slower, base)
    assert r["throughput_ratio"] == pytest.approx(0.5)
    assert r["ttft_p50_ratio"] == pytest.approx(2)
    assert throughput_overhead(r["throughput_ratio"]) == pytest.approx(1.0)
    assert segment_throughput_ratios([segment(0.1, 1, 11, 2, 1.0)], [segment(0.1, 1, 11, 2, 2.0)]) == [2.0]


def fake_figures() -> dict[str, dict[int, dict[str, float]]]:
    scale = {"bare": 1.0, "patch": 1.005, "suffix": 1.02, "stack2": 1.01, "text_prompt": 1.1}
    scale |= {"vllm_bare": 1.0, "client_embeds": 1.1}
    scale |= {"vllm_lora_bare": 1.2, "lora": 2.4}
    return {
        v: {c: point_figures([segment(0.05 * s, 1.0 * s, 33, 2 * c, 2.0 * s)]) for c in (1, 8)}
        for v, s in scale.items()
    }


def test_summary_shape_is_the_output_contract():
    summary = build_summary(fake_figures(), {"lora": "vllm_lora_bare", "client_embeds": "vllm_bare"})
    assert list(summary) == list(SUMMARY_VARIANTS)
    for variant, by_c in summary.items():
        assert set(by_c) == {"1", "8"}, variant
        for cell in by_c.values():
            assert {"throughput_ratio", "ttft_p50_ratio", "ttft_p99_ratio", "itl_p50_ratio"} <= set(cell)
            assert {"e2e_p50_ratio", "e2e_p99_ratio"} <= set(cell)
    assert summary["bare"]["8"]["throughput_ratio"] == 1.0
    assert summary["lora"]["1"]["e2e_p50_ratio"] == pytest.approx(2.0)  # against its own server's bare
    json.dumps(jsonable(summary), allow_nan=False)


def test_unsupported_variant_says_why():
    summary = build_summary(fake_figures(), {}, unsupported={"lora": "no LoRA kernels on this backend"})
    assert summary["lora"] == {"supported": False, "reason": "no LoRA kernels on this backend"}


def test_jsonable_drops_nan_and_stringifies_keys():
    assert jsonable({1: math.nan, "x": [math.inf, 2.0]}) == {"1": None, "x": [None, 2.0]}


def test_report_targets_and_markdown():
    figures = fake_figures()
    summary = build_summary(figures, {"lora": "vllm_lora_bare", "client_embeds": "vllm_bare"})
    results = {
        "engine": "eager",
        "options": {"max_tokens": 32, "repeats": 1},
        "duration_s": 60.0,
        "machine": {"cpus": 2, "ram_gb": 24},
        "baselines": {v: {"lora": "vllm_lora_bare", "client_embeds": "vllm_bare"}.get(v, "bare") for v in figures},
        "figures": figures,
        "summary": summary,
    }
    lines = {t["target"]: t for t in report.targets(results)}
    assert lines["patch throughput, c=1"]["met"]
    assert lines["stack2 TTFT p50, c=8"]["met"]
    assert lines["LoRA overhead / patch overhead (e2e p50 latency), c=1"]["value"] == pytest.approx(1.0 / 0.005)
    assert not lines["patch / client_embeds throughput, c=8"]["met"]
    results["targets"] = list(lines.values())
    text = report.markdown(results)
    assert "| one 50-token patch (the shipped one) | 8 |" in text and "| one 50-token suffix patch | 8 |" in text
    assert "rank-16 LoRA" in text


def test_prompts_are_fresh_and_repeatable():
    book = PromptBook()
    first = book.get(("main", 8, 0), 5)
    assert book.get(("main", 8, 0), 3) == first[:3]
    assert not set(first) & set(book.get(("main", 8, 1), 5))
    assert user_prompt(7) == user_prompt(7)
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_point_plans_cover_the_point():
    from bench.workload import Options, point_plan, request_count

    opts = Options(repeats=3, seconds=30)
    assert request_count(2.0, 1, opts) == 20  # 10 s of work per segment
    assert point_plan(2.0, 8, opts) == (3, request_count(2.0, 8, opts))
    assert point_plan(0.1, 32, opts) == (3, 32)  # at least one full wave, 3 x concurrency over the point
    assert request_count(10.0, 32, opts) % 32 == 0
    segments, per_segment = point_plan(1.0, 1, opts)  # sequential: fine alternation, twice the work
    assert per_segment == 2 and segments * per_segment >= 60


def test_plot_writes_a_png(tmp_path):
    figures = fake_figures()
    results = {"engine": "eager", "figures": figures, "summary": build_summary(figures, {})}
    path = report.plot(results, tmp_path / "overhead.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
