"""Evaluation pieces that need no server: variants, prompt sets, perplexity, reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from patches.chat import encode_chat
from patches.evaluate import (
    EvalPrompt,
    Variant,
    VariantResult,
    by_source,
    load_prompt_sets,
    perplexity,
    write_reports,
)
from patches.train.model import load_base


def test_variant_parsing() -> None:
    assert Variant.parse("r:acme:refusal@2") == Variant("r", "acme", "refusal@2")
    assert Variant.parse("s:acme", system_prompt=True) == Variant("s", "acme", None, True)
    for bad in ("x", "a::b", "a:b:c:d"):
        with pytest.raises(ValueError, match="variant"):
            Variant.parse(bad)


def test_prompt_sets_from_txt_and_labelled_jsonl(tmp_path: Path) -> None:
    (tmp_path / "h.txt").write_text("bad one\n\nbad two\n")
    (tmp_path / "mixed.jsonl").write_text(
        json.dumps({"prompt": "fine", "label": "benign"})
        + "\n"
        + json.dumps({"prompt": "bad three", "harmful": True, "source": "harmbench"})
    )
    (tmp_path / "b.txt").write_text("also fine\n")
    loaded = load_prompt_sets([tmp_path / "h.txt"], [tmp_path / "b.txt"], [tmp_path / "mixed.jsonl"])
    assert loaded == [
        EvalPrompt("bad one", True, "h"),
        EvalPrompt("bad two", True, "h"),
        EvalPrompt("bad three", True, "harmbench"),
        EvalPrompt("also fine", False, "b"),
        EvalPrompt("fine", False, "mixed"),
    ]


def test_rates_by_prompt_set() -> None:
    records = [
        {"source": "hb", "harmful": True, "refused": True},
        {"source": "hb", "harmful": True, "refused": False},
        {"source": "xs", "harmful": False, "refused": True},
        {"source": "hb", "harmful": True, "refused": True},
    ]
    assert by_source(records) == {
        "hb": {"harmful": True, "n": 3, "refusal_rate": pytest.approx(2 / 3)},
        "xs": {"harmful": False, "n": 1, "refusal_rate": 1.0},
    }


def test_batched_perplexity_equals_the_definition(model_dir: Path) -> None:
    model, tokenizer = load_base(model_dir)
    pairs = [("What is 2+2?", "2+2 equals 4."), ("Say hello", "Hello! How can I help you today?")]
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in pairs:
            p = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
            a = tokenizer.encode(answer, add_special_tokens=False)
            logps = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : -1], -1)
            total -= logps.gather(1, torch.tensor(a)[:, None]).sum().item()
            count += len(a)
    assert perplexity(model, tokenizer, pairs, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_reports(tmp_path: Path) -> None:
    results = [
        VariantResult("bare", 0.1, 0.9, 0.02, 10.0, 1.0, "none"),
        VariantResult("patched", 0.96, 0.04, 0.05, 12.0, 1.2, "refusal@1"),
    ]
    results[1].by_source = {
        "hb": {"harmful": True, "n": 80, "refusal_rate": 0.95},
        "xs": {"harmful": False, "n": 50, "refusal_rate": 0.05},
    }
    results[0].by_source = {"hb": {"harmful": True, "n": 80, "refusal_rate": 0.1}}
    paths = write_reports(results, tmp_path, 100, 50)
    text = paths["markdown"].read_text()
    assert "| patched | refusal@1 | 96.0% | 4.0% | 5.0% | 12.00 | 1.20× |" in text
    assert "| variant | refusal hb (80) | over-refusal xs (50) |" in text
    assert "| bare | 10.0% | – |" in text and "| patched | 95.0% | 5.0% |" in text
    assert json.loads(paths["json"].read_text())[1]["refusal_rate"] == 0.96
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_frontier_has_a_point_per_variant_and_per_earlier_setting(tmp_path: Path) -> None:
    from patches.frontier import Point, points_from

    results = [VariantResult("bare", 0.1, 0.9, 0.0, 10.0, 1.0, "none"), VariantResult("p", 0.9, 0.1, 0.05)]
    first = write_reports(results, tmp_path / "a", 10, 10)
    assert first["frontier"].read_bytes()[:4] == b"\x89PNG"
    earlier = points_from(first["json"])
    assert earlier == [Point("bare", 0.0, 0.1), Point("p", 0.05, 0.9)]
    second = write_reports(results[:1], tmp_path / "b", 10, 10, earlier=[Point("old", 0.3, 0.8)])
    assert second["frontier"].read_bytes()[:4] == b"\x89PNG"
