"""The real server on the real vLLM engine: exact patch injection, streaming, tenants, bad input."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from patches.fingerprint import model_spec
from patches.format import load_patch
from patches.stack import compose_stack, inputs_embeds
from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.engine

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
GREEDY = {"temperature": 0, "max_tokens": 32, "ignore_eos": True}


def chat(server: RunningServer, tenant: str, messages: list | None = None, **extra) -> httpx.Response:
    headers = {"X-Tenant-Id": tenant, **extra.pop("headers", {})}
    body = {"messages": messages or STORY, **GREEDY, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_two_patch_stack_matches_hf_generate_with_inputs_embeds(
    server: RunningServer, model_dir: Path, hf_model: AutoModelForCausalLM
) -> None:
    response = chat(server, "stacked")
    assert response.headers["X-Patch-Applied"] == "alpha@1+beta@1"
    patches = _patches(server, "alpha", "beta")
    expected = hf_reference(hf_model, model_dir, patches, chat_ids(model_dir, STORY))
    assert text_of(response) == expected
    assert response.json()["usage"]["completion_tokens"] == 32
    assert response.json()["usage"]["patch_tokens"] == 12 + 1 + 8


def chat_ids(model_dir: Path, messages: list) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def hf_reference(hf_model: AutoModelForCausalLM, model_dir: Path, patches: list, prompt_ids: list[int]) -> str:
    """32 greedy tokens of HF ``generate(inputs_embeds=…)`` on the stack laid out by :mod:`patches.stack`."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layout = compose_stack(patches, separator_id=tokenizer.encode("\n", add_special_tokens=False)[0])
    embeds = inputs_embeds(layout, prompt_ids, hf_model.get_input_embeddings())[None]
    with torch.no_grad():
        out = hf_model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return tokenizer.decode(out[0][-32:], skip_special_tokens=True)


def _patches(server: RunningServer, *names: str) -> list:
    spec = model_spec(server.model_dir)
    return [load_patch(server.patch_dir / f"{n}-v1.safetensors", expect=spec) for n in names]


@pytest.mark.parametrize(("tenant", "names"), [("suffixed", ("omega",)), ("mixed", ("alpha", "omega"))])
def test_suffix_and_mixed_stacks_match_hf_generate(
    server: RunningServer, hf_model: AutoModelForCausalLM, tenant: str, names: tuple[str, ...]
) -> None:
    """Suffix rows go after the chat-templated prompt (after the assistant turn's opening), prefix rows before."""
    response = chat(server, tenant)
    assert response.headers["X-Patch-Applied"] == "+".join(f"{n}@1" for n in names)
    assert text_of(response) == hf_reference(
        hf_model, server.model_dir, _patches(server, *names), chat_ids(server.model_dir, STORY)
    )
    assert response.json()["usage"]["patch_tokens"] == {"suffixed": 10, "mixed": 12 + 10}[tenant]


def test_suffix_rows_never_share_prefix_cache_blocks_with_real_tokens(
    server: RunningServer, hf_model: AutoModelForCausalLM, model_dir: Path
) -> None:
    """vLLM's block hash covers token ids and embeddings but not which positions are embeddings (#56655).

    A suffix patch's rows carry placeholder id 0 after the prompt. A token-id prompt that spells the same
    ids (the chat prompt, then real id-0 tokens, then more) must not reuse the blocks that hold the patch
    rows: not on the same tenant (same salt; the real tokens' zero embeddings, and no all-zero patch row,
    keep the hashes apart) and not on the bare tenant (another salt). With the cache warm from the
    patched request, each must equal its own uncached HF reference.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = chat_ids(model_dir, STORY)
    look_alike = prompt_ids + [0] * 10 + tokenizer.encode(" and so the story goes on" * 8, add_special_tokens=False)

    def complete(tenant: str, ids: list[int]) -> str:
        r = httpx.post(
            f"{server.url}/v1/completions",
            headers={"X-Tenant-Id": tenant},
            json={"prompt": ids, **GREEDY},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def reference(patches: list, ids: list[int]) -> str:
        return hf_reference(hf_model, model_dir, patches, ids)

    omega = _patches(server, "omega")
    for _ in range(2):  # the second round runs with every block of the first in the cache
        assert text_of(chat(server, "suffixed")) == reference(omega, prompt_ids)
        assert complete("suffixed", look_alike) == reference(omega, look_alike)
        assert complete("bare", look_alike) == reference([], look_alike)


def test_patch_changes_the_output(server: RunningServer) -> None:
    assert text_of(chat(server, "bare")) != text_of(chat(server, "stacked"))


def test_no_patch_equals_plain_vllm_text_generation(server: RunningServer, model_dir: Path) -> None:
    served = text_of(chat(server, "bare"))
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        max_model_len=1024,
        block_size=32,
    )
    try:
        out = llm.chat(STORY, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    assert served == out[0].outputs[0].text


@pytest.mark.parametrize("tenant", ["bare", "stacked"])
def test_streaming_equals_non_streaming(server: RunningServer, tenant: str) -> None:
    expected = text_of(chat(server, tenant))
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        headers={"X-Tenant-Id": tenant},
        json={"messages": STORY, **GREEDY, "stream": True},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        frames = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert frames[-1] == "[DONE]"
    text = "".join(json.loads(f)["choices"][0]["delta"].get("content", "") for f in frames[:-1])
    assert text == expected


def test_completions_endpoint_applies_the_stack(server: RunningServer) -> None:
    def complete(tenant: str) -> str:
        r = httpx.post(
            f"{server.url}/v1/completions",
            headers={"X-Tenant-Id": tenant},
            timeout=120,
            json={"prompt": "The three primary colors are", **GREEDY},
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert complete("single") != complete("bare")
    assert complete("single") == complete("single")


async def test_interleaved_tenants_each_get_their_own_stack(server: RunningServer) -> None:
    prompts = [[{"role": "user", "content": f"Tell me a fact about the number {i}."}] for i in range(4)]
    reference = {(t, i): text_of(chat(server, t, p)) for t in ("single", "stacked") for i, p in enumerate(prompts)}

    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:

        async def one(tenant: str, i: int) -> tuple[str, int, str, str]:
            r = await client.post(
                "/v1/chat/completions", headers={"X-Tenant-Id": tenant}, json={"messages": prompts[i], **GREEDY}
            )
            return tenant, i, r.headers["X-Patch-Applied"], text_of(r)

        jobs = [one(t, i) for i in range(4) for t in ("single", "stacked")] * 2
        results = await asyncio.gather(*jobs)
    for tenant, i, applied, text in results:
        assert applied == {"single": "alpha@1", "stacked": "alpha@1+beta@1"}[tenant]
        assert text == reference[(tenant, i)], (tenant, i)


def test_openai_sdk_works_unchanged(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", default_headers={"X-Tenant-Id": "single"})
    models = client.models.list()
    assert models.data[0].id
    completion = client.chat.completions.create(
        model=models.data[0].id, messages=STORY, temperature=0, max_tokens=16, seed=3
    )
    assert completion.choices[0].message.content and completion.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=models.data[0].id,
        messages=STORY,
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    text = client.completions.create(model=models.data[0].id, prompt="Paris is", max_tokens=5, temperature=0)
    assert text.choices[0].text
    raw = client.chat.completions.with_raw_response.create(model=models.data[0].id, messages=STORY, max_tokens=2)
    assert raw.headers["X-Patch-Applied"] == "alpha@1"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=models.data[0].id, messages=STORY, max_tokens=5000)
    assert info.value.body["param"] == "max_tokens"


def test_sampling_with_seed_and_n(server: RunningServer) -> None:
    body = {"temperature": 1.0, "top_p": 0.9, "seed": 42, "n": 3, "max_tokens": 12}
    first = chat(server, "single", **body).json()
    second = chat(server, "single", **body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in first["choices"]] == [c["message"]["content"] for c in second["choices"]]
    stopped = chat(server, "bare", stop=[" the", "."], max_tokens=64)
    assert " the" not in text_of(stopped) and "." not in text_of(stopped)


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{not json", {}, 400),
        (b'{"max_tokens": 5}', {}, 400),
        (b'{"messages": [{"role": "user", "content": 5}]}', {}, 400),
        (json.dumps({"messages": [{"role": "user", "content": "hi " * 2000}]}).encode(), {}, 400),
        (json.dumps({"messages": STORY, "max_tokens": 0}).encode(), {}, 400),
        (json.dumps({"messages": STORY, "max_tokens": 1_000_000}).encode(), {}, 400),
        (json.dumps({"messages": STORY}).encode(), {"X-Patch-Stack": "wide"}, 404),
        (json.dumps({"messages": STORY}).encode(), {"X-Tenant-Id": "ghost"}, 401),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(
    server: RunningServer, content: bytes, headers: dict, status: int
) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=content,
        timeout=60,
        headers={"X-Tenant-Id": "stacked", "content-type": "application/json", **headers},
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    assert text_of(chat(server, "single", max_tokens=4))


def test_refused_patch_files_are_logged_with_reasons(server: RunningServer) -> None:
    log = server.log()
    assert "corrupt.safetensors refused (bad_format)" in log or "corrupt.safetensors refused (truncated)" in log
    assert "wide.safetensors refused (bad_shape)" in log
