"""``eval --mode toxicity`` without a server: sampling requests, metrics, perplexity and reports."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest
import torch

from patches import toxeval
from patches.continuations import Continuation
from patches.evaluate import Variant


class TableScorer:
    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def score(self, texts: list[str]) -> list[float]:
        return [self.table.get(t, 0.0) for t in texts]


def _server(accept_n: bool, seen: list[dict]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append({**body, "tenant": request.headers["X-Tenant-Id"], "stack": request.headers.get("X-Patch-Stack")})
        if body["n"] > 1 and not accept_n:
            return httpx.Response(400, json={"error": {"message": "n", "param": "n"}})
        choices = [{"index": i, "text": f" s{body['seed'] + i}"} for i in range(body["n"])]
        return httpx.Response(200, json={"choices": choices}, headers={"X-Patch-Applied": "detox@1"})

    return httpx.MockTransport(handle)


@pytest.mark.parametrize("accept_n", [True, False])
def test_sampling_requests_k_seeded_completions(accept_n: bool) -> None:
    seen: list[dict] = []

    async def go() -> tuple[list[str], str]:
        async with httpx.AsyncClient(base_url="http://t", transport=_server(accept_n, seen)) as client:
            variant = Variant("detox", "acme", "detox")
            return await toxeval.sample(client, variant, "Open", k=20, max_tokens=7, gate=asyncio.Semaphore(2))

    texts, applied = asyncio.run(go())
    seed = toxeval.prompt_seed("Open")
    assert texts == [f" s{seed + i}" for i in range(20)] and applied == "detox@1"
    ok = [s for s in seen if accept_n or s["n"] == 1]
    assert len(ok) == (2 if accept_n else 20)  # n ≤ 16 per request, or one request per sample
    assert all(s["prompt"] == "Open" and s["max_tokens"] == 7 and s["temperature"] == 1.0 for s in seen)
    assert {(s["tenant"], s["stack"]) for s in seen} == {("acme", "detox")}


def test_system_prompt_variant_writes_the_instruction_before_the_opening() -> None:
    seen: list[dict] = []

    async def go() -> None:
        async with httpx.AsyncClient(base_url="http://t", transport=_server(True, seen)) as client:
            variant = Variant("sp", "base", "none", system_prompt=True)
            await toxeval.sample(client, variant, "Open", k=2, max_tokens=4, gate=asyncio.Semaphore(1))

    asyncio.run(go())
    assert seen[0]["prompt"] == toxeval.DETOX_TEXT_PREFIX + "Open"


def test_metrics_follow_realtoxicityprompts() -> None:
    prompts = [Continuation("p1", "a"), Continuation("p2", "a"), Continuation("p3", "b")]
    texts = [[" fine", " bad"], [" fine", " meh"], [" I'm sorry, I can't continue this.", " fine"]]
    result = toxeval.score_variant("v", prompts, texts, TableScorer({" bad": 0.9, " meh": 0.4, " fine": 0.1}))
    assert result.expected_max_toxicity == pytest.approx((0.9 + 0.4 + 0.1) / 3)
    assert result.toxicity_probability == pytest.approx(1 / 3)
    assert result.mean_toxicity == pytest.approx((0.1 + 0.9 + 0.1 + 0.4 + 0.0 + 0.1) / 6)
    assert result.refusal_rate == pytest.approx(1 / 6)
    assert result.samples_per_prompt == 2
    assert result.by_source["a"]["n"] == 2 and result.by_source["b"]["expected_max_toxicity"] == pytest.approx(0.1)
    assert result.by_source["a"]["toxicity_probability"] == 0.5


def test_continuation_perplexity_equals_the_definition(model_dir: Path) -> None:
    from patches.train.model import load_base

    model, tokenizer = load_base(model_dir)
    pairs = [("The cat sat on", " the mat."), ("Once upon a time", " there was a small village by the sea.")]
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, text in pairs:
            p = tokenizer.encode(prompt, add_special_tokens=False)
            c = tokenizer.encode(text, add_special_tokens=False)
            logps = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1], -1)
            total -= logps.gather(1, torch.tensor(c)[:, None]).sum().item()
            count += len(c)
    ppl, tokens = toxeval.continuation_perplexity(model, tokenizer, pairs, batch_size=2)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-4) and tokens == count


def test_reports(tmp_path: Path) -> None:
    prompts = [Continuation("p1", "rtp"), Continuation("p2", "other")]
    scorer = TableScorer({" x": 0.8})
    bare = toxeval.score_variant("bare", prompts, [[" x", " y"], [" y", " y"]], scorer)
    patched = toxeval.score_variant("detox", prompts, [[" y", " y"], [" y", " y"]], scorer)
    for r, ppl in ((bare, 10.0), (patched, 12.0)):
        r.perplexity, r.perplexity_ratio, r.mean_tokens = ppl, ppl / 10.0, 1.0
    paths = toxeval.write_reports([bare, patched], tmp_path, 2, "bare")
    text = paths["markdown"].read_text()
    assert "| bare | – | 0.400 ± 0.400 | +0.0% | 50.0% | 0.200 | 0.0% | 10.00 | 1.00× | 1.0 |" in text
    assert "| detox | – | 0.000 ± 0.000 | -100.0% | 0.0% |" in text
    assert "| variant | rtp (1) | other (1) |" in text and "| bare | 0.800 / 100% | 0.000 / 0% |" in text
    saved = json.loads(paths["json"].read_text())
    assert saved[1]["name"] == "detox" and saved[0]["records"][0]["continuations"] == [" x", " y"]


def test_detox_bench_pins_one_tenant_per_patch(tmp_path: Path, make_meta, make_rows) -> None:
    from bench.launch import tenants_for
    from patches.format import save_patch

    path = save_patch(tmp_path / "d.safetensors", make_rows(), make_meta(name="detox", version=4))
    tenants, variants = tenants_for([path])
    assert tenants[1] == {"id": "detox-v4", "default_stack": ["detox@4"], "allowed_patches": ["detox"]}
    assert variants == ["bare:bare:none", "detox@4:detox-v4"]


def test_eval_bench_stack_tenant_pins_the_stack_in_order(tmp_path: Path, make_meta, make_rows) -> None:
    from bench.launch import tenants_for
    from patches.format import save_patch

    a = save_patch(tmp_path / "a.safetensors", make_rows(), make_meta(name="refusal", version=3))
    b = save_patch(tmp_path / "b.safetensors", make_rows(), make_meta(name="fairness", version=1))
    tenants, variants = tenants_for([a, b], ["fairness@1+refusal@3"])
    assert tenants[-1] == {
        "id": "stack-0",
        "default_stack": ["fairness@1", "refusal@3"],
        "allowed_patches": ["fairness", "refusal"],
    }
    assert variants[-1] == "fairness@1+refusal@3:stack-0"


def test_eval_root_copies_each_patch_under_its_tenant_id(tmp_path: Path, make_meta, make_rows) -> None:
    from bench.launch import eval_root
    from patches.format import save_patch

    a = save_patch(tmp_path / "a.safetensors", make_rows(), make_meta(name="refusal", version=3))
    b = save_patch(tmp_path / "b.safetensors", make_rows(), make_meta(name="fairness", version=1))
    (tmp_path / "trust").mkdir()
    root, variants = eval_root("t-", [a, b], trust_from=tmp_path / "trust", stacks=["refusal@3+fairness@1"])
    assert sorted(p.name for p in (root / "patches").iterdir()) == ["fairness-v1.safetensors", "refusal-v3.safetensors"]
    assert (root / "patches" / "refusal-v3.safetensors").read_bytes() == a.read_bytes()
    assert variants == [
        "bare:bare:none",
        "refusal@3:refusal-v3",
        "fairness@1:fairness-v1",
        "refusal@3+fairness@1:stack-0",
    ]
