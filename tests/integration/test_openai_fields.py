"""Issue 16 on the real vLLM engine (CPU): structured outputs, log-probabilities, logit_bias,
stop_token_ids and min_tokens, through the ``openai`` SDK, with a patch stack selected by ``model``."""

from __future__ import annotations

import json

import openai
import pytest
from transformers import AutoTokenizer

from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.engine

ASK = [{"role": "user", "content": "Is the sky blue? Answer in JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "boolean"}},
    "required": ["answer"],
    "additionalProperties": False,
}


def test_openai_fields_on_the_engine(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", default_headers={"X-Tenant-Id": "bare"})
    base = client.models.list().data[0].id
    patched = f"{base}:alpha"  # mixed prompt-embeds mode: structured outputs must work there too

    # response_format: json_schema and json_object (xgrammar, on CPU)
    typed = client.chat.completions.create(
        model=patched,
        messages=ASK,
        temperature=0,
        max_tokens=24,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}},
    )
    assert typed.model == f"{base}:alpha@1"
    assert isinstance(json.loads(typed.choices[0].message.content)["answer"], bool), typed.choices[0].message.content
    loose = client.chat.completions.create(
        model=base, messages=ASK, temperature=0, max_tokens=24, response_format={"type": "json_object"}
    )
    # The 135M model tends to keep an open object growing, so it may stop at max_tokens: a JSON object
    # that is cut off, never free text (unconstrained, it answers in prose).
    content = loose.choices[0].message.content
    assert content.startswith("{"), content
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    with pytest.raises(openai.BadRequestError):  # an invalid schema is the client's error, not a 500
        client.chat.completions.create(
            model=base,
            messages=ASK,
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}},
        )

    # logprobs: greedy picks the most likely token, so each token is its own top-1; the stream agrees
    greedy: dict = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    chat = client.chat.completions.create(model=patched, messages=ASK, logprobs=True, top_logprobs=3, **greedy)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 8
    # special tokens (here the EOS that ignore_eos lets through) are listed by their text, as in vLLM's
    # own server, while the content omits them
    assert "".join(t.token for t in content).replace("<|im_end|>", "") == chat.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob) and token.logprob <= 0
    stream = client.chat.completions.create(
        model=patched, messages=ASK, logprobs=True, top_logprobs=3, stream=True, **greedy
    )
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    text = client.completions.create(model=base, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
    # (without ignore_eos, the EOS token ends the list as in vLLM's own server, while the text omits it)
    logprobs = text.choices[0].logprobs
    assert "".join(logprobs.tokens) == text.choices[0].text and len(logprobs.tokens) == 6
    assert all(len(top) in (2, 3) for top in logprobs.top_logprobs)

    # logit_bias, stop_token_ids, min_tokens
    banana = AutoTokenizer.from_pretrained(server.model_dir).encode(" banana", add_special_tokens=False)
    assert len(banana) == 1
    forced = {str(banana[0]): 100}
    common = {"model": base, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 8, "logit_bias": forced}
    assert client.completions.create(**common).choices[0].text == " banana" * 8
    stopped = client.completions.create(**common, extra_body={"stop_token_ids": banana})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens <= 1
    held = client.completions.create(**common, extra_body={"stop_token_ids": banana, "min_tokens": 3})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens >= 4  # 3 held back, then banana
    assert not held.choices[0].text.startswith(" banana")
