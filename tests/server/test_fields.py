"""Every OpenAI request field is implemented or refused by name (issue 16, item 1), over a fake engine."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from server.engine import StructuredOutput
from tests.server.test_api import CHAT, assert_error, post_chat, sse_events
from tests.support import FakeEngine

OPEN = {"X-Tenant-Id": "open"}


def post_completion(http: TestClient, body: dict):
    return http.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 3, **body}, headers=OPEN)


class TestLogprobs:
    def test_chat_logprobs_and_top_logprobs(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        response = post_chat(http, body={**CHAT, "logprobs": True, "top_logprobs": 2})
        assert response.status_code == 200, response.text
        assert engine.requests[-1].sampling.logprobs == 2
        choice = response.json()["choices"][0]
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == [" P0", " w1", " w2", " w3"]
        assert "".join(c["token"] for c in content) == choice["message"]["content"]
        first = content[0]
        assert first["logprob"] == -0.25 and first["bytes"] == list(b" P0")
        assert [t["token"] for t in first["top_logprobs"]] == [" P0", " alt1"]
        assert first["top_logprobs"][1] == {"token": " alt1", "logprob": -1.25, "bytes": list(b" alt1")}

    def test_chat_logprobs_without_top(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        content = post_chat(http, body={**CHAT, "logprobs": True}).json()["choices"][0]["logprobs"]["content"]
        assert engine.requests[-1].sampling.logprobs == 0
        assert len(content) == 4 and all(c["top_logprobs"] == [] for c in content)

    def test_no_logprobs_unless_asked(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        assert post_chat(http).json()["choices"][0]["logprobs"] is None
        assert engine.requests[-1].sampling.logprobs is None

    def test_chat_stream_carries_each_tokens_logprobs(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        body = {**CHAT, "logprobs": True, "top_logprobs": 1, "stream": True}
        chunks = [json.loads(e) for e in sse_events(post_chat(http, body=body).text)[:-1]]
        deltas = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
        tokens = [t["token"] for d in deltas for t in d["logprobs"]["content"]]
        assert tokens == [" P0", " w1", " w2", " w3"]
        assert all(d["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] == -0.25 for d in deltas)

    @pytest.mark.parametrize(
        ("extra", "param"),
        [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")],
    )
    def test_chat_top_logprobs_bounds(self, client: tuple[TestClient, FakeEngine], extra: dict, param: str) -> None:
        http, _ = client
        assert_error(post_chat(http, body={**CHAT, **extra}), 400, "invalid_request_error", param)

    def test_completion_logprobs(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        response = post_completion(http, {"logprobs": 2})
        assert response.status_code == 200, response.text
        assert engine.requests[-1].sampling.logprobs == 2
        logprobs = response.json()["choices"][0]["logprobs"]
        assert logprobs["tokens"] == [" P0", " w1", " w2"]
        assert logprobs["token_logprobs"] == [-0.25, -0.25, -0.25]
        assert logprobs["top_logprobs"][0] == {" P0": -0.25, " alt1": -1.25}
        assert logprobs["text_offset"] == [0, 3, 6]

    def test_completion_logprobs_stream_offsets_run_on(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        events = sse_events(post_completion(http, {"logprobs": 0, "stream": True}).text)
        parts = [json.loads(e)["choices"][0]["logprobs"] for e in events[:-1]]
        assert [p["text_offset"] for p in parts] == [[0], [3], [6]]
        assert [p["top_logprobs"] for p in parts] == [[{" P0": -0.25}], [{" w1": -0.25}], [{" w2": -0.25}]]

    def test_completion_logprobs_with_echo_is_refused(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        assert_error(post_completion(http, {"logprobs": 1, "echo": True}), 400, "invalid_request_error", "logprobs")


class TestResponseFormat:
    SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}

    @pytest.mark.parametrize(
        ("response_format", "expected"),
        [
            ({"type": "text"}, None),
            ({"type": "json_object"}, StructuredOutput()),
            ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}, StructuredOutput(SCHEMA)),
            (  # strict or not, the schema is enforced while decoding
                {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": False}},
                StructuredOutput(SCHEMA),
            ),
            ({"type": "json_schema", "json_schema": {"name": "a"}}, StructuredOutput()),  # no schema: any JSON
        ],
    )
    def test_reaches_the_engine_as_structured_output(
        self, client: tuple[TestClient, FakeEngine], response_format: dict, expected: StructuredOutput | None
    ) -> None:
        http, engine = client
        response = post_chat(http, body={**CHAT, "response_format": response_format})
        assert response.status_code == 200, response.text
        assert engine.requests[-1].sampling.structured == expected

    @pytest.mark.parametrize(
        ("response_format", "param"),
        [
            ({"type": "yaml"}, "response_format"),
            ({"type": "json_schema"}, "response_format.json_schema.json_schema"),
            (
                {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
                "response_format.json_schema.json_schema.name",
            ),
            (
                {"type": "json_schema", "json_schema": {"name": "a", "description": "d", "schema": SCHEMA}},
                "response_format.json_schema.json_schema.description",
            ),
            ({"type": "json_object", "strict": True}, "response_format.json_object.strict"),
        ],
    )
    def test_malformed_or_unsupported_is_400(
        self, client: tuple[TestClient, FakeEngine], response_format: dict, param: str
    ) -> None:
        http, _ = client
        body = {**CHAT, "response_format": response_format}
        assert_error(post_chat(http, body=body), 400, "invalid_request_error", param)


class TestSamplingExtras:
    def test_logit_bias(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        assert post_chat(http, body={**CHAT, "logit_bias": {"42": -100, "7": 2.5}}).status_code == 200
        assert engine.requests[-1].sampling.logit_bias == {42: -100.0, 7: 2.5}
        assert post_completion(http, {"logit_bias": {"42": 5}}).status_code == 200
        assert engine.requests[-1].sampling.logit_bias == {42: 5.0}

    @pytest.mark.parametrize("bias", [{"hello": 1}, {"-3": 1}, {"5": 101}, {"99999999": 1}, {"9" * 5000: 1}])
    def test_bad_logit_bias(self, client: tuple[TestClient, FakeEngine], bias: dict) -> None:
        http, _ = client
        assert_error(post_chat(http, body={**CHAT, "logit_bias": bias}), 400, "invalid_request_error", "logit_bias")

    def test_stop_token_ids_and_min_tokens(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        response = post_chat(http, body={**CHAT, "stop_token_ids": [2, 5], "min_tokens": 3})
        assert response.status_code == 200, response.text
        sampling = engine.requests[-1].sampling
        assert (sampling.stop_token_ids, sampling.min_tokens) == ([2, 5], 3)
        assert post_completion(http, {"stop_token_ids": [9], "min_tokens": 1}).status_code == 200
        assert (engine.requests[-1].sampling.stop_token_ids, engine.requests[-1].sampling.min_tokens) == ([9], 1)

    @pytest.mark.parametrize(
        ("extra", "param"),
        [
            ({"stop_token_ids": [10**8]}, "stop_token_ids"),
            ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
            ({"min_tokens": 5}, "min_tokens"),  # more than max_tokens (4)
            ({"min_tokens": -1}, "min_tokens"),
        ],
    )
    def test_bad_token_controls(self, client: tuple[TestClient, FakeEngine], extra: dict, param: str) -> None:
        http, _ = client
        assert_error(post_chat(http, body={**CHAT, **extra}), 400, "invalid_request_error", param)

    def test_null_means_default(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        body = {**CHAT, "temperature": None, "n": None, "stop": None, "tools": None, "response_format": None}
        assert post_chat(http, body=body).status_code == 200
        assert (engine.requests[-1].sampling.temperature, engine.requests[-1].sampling.n) == (1.0, 1)


class TestUser:
    @pytest.mark.parametrize("field", ["user", "safety_identifier"])
    def test_end_user_is_logged_not_trusted(
        self, client: tuple[TestClient, FakeEngine], caplog: pytest.LogCaptureFixture, field: str
    ) -> None:
        http, _ = client
        with caplog.at_level(logging.INFO, logger="server.serving"):
            response = post_chat(http, "locked", body={**CHAT, field: "end-user-7\nforged line"})
        assert response.status_code == 200 and response.headers["X-Patch-Applied"] == "alpha@1"  # no effect
        lines = [r.getMessage() for r in caplog.records if "end-user-7" in r.getMessage()]
        assert len(lines) == 1 and "tenant locked" in lines[0] and "\\n" in lines[0]  # repr: no log injection

    def test_too_long_user_is_400(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        assert_error(post_chat(http, body={**CHAT, "user": "u" * 257}), 400, "invalid_request_error", "user")


class TestRefusedAndIgnored:
    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
            ("tool_choice", "required"),
            ("tool_choice", {"type": "function", "function": {"name": "f"}}),
            ("functions", [{"name": "f"}]),
            ("function_call", {"name": "f"}),
            ("audio", {"voice": "alloy", "format": "wav"}),
            ("modalities", ["text", "audio"]),
            ("moderation", {"model": "omni-moderation-latest"}),
            ("prediction", {"type": "content", "content": "x"}),
            ("reasoning_effort", "low"),
            ("verbosity", "low"),
            ("service_tier", "flex"),
            ("store", True),
            ("web_search_options", {}),
            ("frobnicate", 1),
            ("top_k", 5),
        ],
    )
    def test_chat_field_refused_by_name(self, client: tuple[TestClient, FakeEngine], field: str, value: object) -> None:
        http, _ = client
        error = assert_error(post_chat(http, body={**CHAT, field: value}), 400, "invalid_request_error", field)
        assert field in error["message"]

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("tools", []),
            ("tool_choice", "none"),
            ("modalities", ["text"]),
            ("store", False),
            ("service_tier", "auto"),
            ("reasoning_effort", "none"),
            ("parallel_tool_calls", True),
            ("metadata", {"run": "7"}),
            ("prompt_cache_key", "k"),
            ("prompt_cache_retention", "24h"),
            ("stream_options", {"include_obfuscation": False}),
        ],
    )
    def test_off_values_and_ignored_fields_accepted(
        self, client: tuple[TestClient, FakeEngine], field: str, value: object
    ) -> None:
        http, _ = client
        assert post_chat(http, body={**CHAT, field: value}).status_code == 200

    @pytest.mark.parametrize(
        ("message", "param"),
        [
            ({"role": "user", "content": "hi", "name": "alice"}, "messages.0.name"),
            ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "messages.0.role"),
            ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}, "messages.0.tool_calls"),
            ({"role": "user", "content": "hi", "cache": True}, "messages.0.cache"),
        ],
    )
    def test_message_fields_refused_by_name(
        self, client: tuple[TestClient, FakeEngine], message: dict, param: str
    ) -> None:
        http, _ = client
        assert_error(post_chat(http, body={"messages": [message]}), 400, "invalid_request_error", param)

    def test_nested_unknown_field(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True, "chunk_size": 3}}
        assert_error(post_chat(http, body=body), 400, "invalid_request_error", "stream_options.chunk_size")

    @pytest.mark.parametrize(
        ("extra", "param"),
        [({"best_of": 3}, "best_of"), ({"suffix": "end"}, "suffix"), ({"response_format": {}}, "response_format")],
    )
    def test_completion_fields_refused(self, client: tuple[TestClient, FakeEngine], extra: dict, param: str) -> None:
        http, _ = client
        assert_error(post_completion(http, extra), 400, "invalid_request_error", param)

    def test_best_of_equal_to_n_is_accepted(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        assert post_completion(http, {"best_of": 2, "n": 2}).status_code == 200
