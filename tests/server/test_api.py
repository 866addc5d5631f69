"""The OpenAI-compatible API over a fake engine: shapes, headers, tenants, stacks and errors."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import KEYED_TENANTS
from tests.support import FakeEngine

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def post_chat(client: TestClient, tenant: str = "open", body: dict | None = None, **headers: str):
    return client.post(
        "/v1/chat/completions", json=CHAT if body is None else body, headers={"X-Tenant-Id": tenant, **headers}
    )


def sse_events(text: str) -> list[str]:
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f.removeprefix("data: ") for f in frames]


def assert_error(response, status: int, type_: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


class TestChat:
    def test_response_shape_usage_and_applied_header(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        response = post_chat(http, "locked")
        assert response.status_code == 200
        assert response.headers["X-Patch-Applied"] == "alpha@1"
        body = response.json()
        assert body["id"].startswith("chatcmpl-")
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": " P12 w1 w2 w3"}
        assert body["choices"][0]["finish_reason"] == "length"
        prompt_tokens = len(engine.requests[-1].prompt_token_ids)
        assert body["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 4,
            "total_tokens": prompt_tokens + 4,
            "patch_tokens": 12,
        }

    def test_bare_tenant_sends_no_prefix(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        response = post_chat(http, "open")
        assert response.headers["X-Patch-Applied"] == "none"
        assert engine.requests[-1].layout is None

    def test_default_stack_of_two_joined_by_separator(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        response = post_chat(http, "stacked")
        assert response.headers["X-Patch-Applied"] == "alpha@1+beta@1"
        layout = engine.requests[-1].layout
        assert layout is not None and layout.suffix is None and len(layout) == 12 + 1 + 8
        assert layout.prefix is not None and layout.prefix.is_token == [False] * 12 + [True] + [False] * 8

    def test_sampling_parameters_reach_the_engine(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        body = {**CHAT, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["x", "y"], "n": 2}
        response = post_chat(http, body=body)
        sampling = engine.requests[-1].sampling
        assert (sampling.temperature, sampling.top_p, sampling.seed, sampling.stop, sampling.n) == (
            0.5,
            0.9,
            7,
            ["x", "y"],
            2,
        )
        assert [c["index"] for c in response.json()["choices"]] == [0, 1]

    def test_max_tokens_defaults_to_remaining_context(self, make_client) -> None:
        http, engine = make_client(max_model_len=200)
        post_chat(http, "locked", body={"messages": CHAT["messages"]})
        request = engine.requests[-1]
        assert request.sampling.max_tokens == 200 - request.total_prompt_tokens

    def test_each_stack_gets_its_own_cache_salt(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        post_chat(http, "open")
        post_chat(http, "open", **{"X-Patch-Stack": "alpha"})
        post_chat(http, "locked")
        salts = [r.cache_salt for r in engine.requests[-3:]]
        assert len(set(salts)) == 3


class TestStreaming:
    def test_frames_role_first_done_last_and_text_matches(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        streamed = post_chat(http, "locked", body=body)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.headers["X-Patch-Applied"] == "alpha@1"
        events = sse_events(streamed.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == post_chat(http, "locked").json()["choices"][0]["message"]["content"]
        assert len({c["id"] for c in chunks}) == 1

    def test_engine_failure_mid_stream_becomes_error_frame(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        engine.fail_after = 2
        try:
            events = sse_events(post_chat(http, body={**CHAT, "stream": True}).text)
        finally:
            engine.fail_after = None
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "server_error"
        assert post_chat(http).status_code == 200

    def test_completion_stream_with_echo(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        body = {"prompt": "Once upon", "max_tokens": 3, "stream": True, "echo": True}
        events = sse_events(http.post("/v1/completions", json=body, headers={"X-Tenant-Id": "open"}).text)
        texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
        assert "".join(texts) == "Once upon P0 w1 w2"


class TestCompletions:
    def test_text_and_token_prompts(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        text = http.post(
            "/v1/completions", json={"prompt": "Hi there", "max_tokens": 2}, headers={"X-Tenant-Id": "locked"}
        )
        assert text.status_code == 200 and text.json()["id"].startswith("cmpl-")
        assert text.json()["choices"][0]["text"] == " P12 w1"
        ids = engine.requests[-1].prompt_token_ids
        tokens = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 2}, headers={"X-Tenant-Id": "locked"})
        assert tokens.status_code == 200 and engine.requests[-1].prompt_token_ids == ids

    def test_out_of_vocabulary_token_prompt(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        response = http.post("/v1/completions", json={"prompt": [1, 10**9]}, headers={"X-Tenant-Id": "open"})
        assert_error(response, 400, "invalid_request_error", "prompt")


class TestStackHeader:
    @pytest.mark.parametrize(
        ("header", "applied"),
        [
            ("beta", "beta@2"),
            ("beta@1", "beta@1"),
            ("beta,alpha", "beta@2+alpha@1"),
            ("none", "none"),
            (" alpha , beta@2 ", "alpha@1+beta@2"),
        ],
    )
    def test_selects_ordered_subset(self, client: tuple[TestClient, FakeEngine], header: str, applied: str) -> None:
        http, _ = client
        response = post_chat(http, "open", **{"X-Patch-Stack": header})
        assert response.status_code == 200, response.text
        assert response.headers["X-Patch-Applied"] == applied

    @pytest.mark.parametrize("header", ["", "alpha,,beta", "Alpha", "alpha@", "alpha@v2", "alpha,alpha"])
    def test_malformed_header_is_400(self, client: tuple[TestClient, FakeEngine], header: str) -> None:
        http, _ = client
        assert_error(post_chat(http, "open", **{"X-Patch-Stack": header}), 400, "invalid_request_error")

    def test_forbidden_patch_is_403(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        assert_error(post_chat(http, "locked", **{"X-Patch-Stack": "beta"}), 403, "permission_error", "X-Patch-Stack")

    def test_none_when_not_allowed_is_403(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        assert_error(post_chat(http, "locked", **{"X-Patch-Stack": "none"}), 403, "permission_error")

    def test_unloaded_version_is_404(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        assert_error(post_chat(http, "open", **{"X-Patch-Stack": "beta@9"}), 404, "not_found_error")

    def test_default_stack_not_loaded_is_503_and_not_ready(self, make_client) -> None:
        tenants = {"tenants": [{"id": "t", "default_stack": ["ghost"], "allowed_patches": ["ghost"]}]}
        http, _ = make_client(tenants=tenants)
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "ghost" in ready.json()["problems"][0]
        assert "ghost" in assert_error(post_chat(http, "t"), 503, "service_unavailable")["message"]


class TestTenants:
    def test_missing_and_unknown_tenant_are_401(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        assert_error(http.post("/v1/chat/completions", json=CHAT), 401, "authentication_error", "X-Tenant-Id")
        assert_error(post_chat(http, "nobody"), 401, "authentication_error")

    def test_api_keys_decide_the_tenant(self, make_client) -> None:
        http, _ = make_client(tenants=KEYED_TENANTS)
        ok = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-acme"})
        assert ok.status_code == 200 and ok.headers["X-Patch-Applied"] == "alpha@1"
        other = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-globex"})
        assert other.headers["X-Patch-Applied"] == "none"
        assert_error(http.post("/v1/chat/completions", json=CHAT), 401, "authentication_error")
        wrong = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-nope"})
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        # In key mode the tenant header cannot pick another tenant.
        spoof = http.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-globex", "X-Tenant-Id": "acme"}
        )
        assert_error(spoof, 403, "permission_error")


class TestBadInput:
    def test_malformed_json(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        response = http.post(
            "/v1/chat/completions", content=b"{bad", headers={"X-Tenant-Id": "open", "content-type": "application/json"}
        )
        assert "JSON" in assert_error(response, 400, "invalid_request_error")["message"]

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({}, "messages"),
            ({"messages": []}, "messages"),
            ({"messages": "hi"}, "messages"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
            ({**CHAT, "max_tokens": 0}, "max_tokens"),
            ({**CHAT, "max_tokens": "many"}, "max_tokens"),
            ({**CHAT, "temperature": 3}, "temperature"),
            ({**CHAT, "top_p": 0}, "top_p"),
            ({**CHAT, "n": 0}, "n"),
            ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ],
    )
    def test_invalid_fields(self, client: tuple[TestClient, FakeEngine], body: dict, param: str) -> None:
        http, _ = client
        assert_error(post_chat(http, body=body), 400, "invalid_request_error", param)

    def test_prompt_longer_than_context(self, make_client) -> None:
        http, _ = make_client(max_model_len=64)
        body = {"messages": [{"role": "user", "content": "word " * 200}]}
        error = assert_error(post_chat(http, body=body), 400, "invalid_request_error", "messages")
        assert "maximum context length is 64" in error["message"]

    def test_max_tokens_beyond_context(self, make_client) -> None:
        http, _ = make_client(max_model_len=128)
        error = assert_error(
            post_chat(http, "locked", body={**CHAT, "max_tokens": 120}), 400, "invalid_request_error", "max_tokens"
        )
        assert "12 of them patch tokens" in error["message"]

    def test_unknown_fields_are_refused_by_name(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, engine = client
        before = len(engine.requests)
        error = assert_error(post_chat(http, body={**CHAT, "frobnicate": True}), 400, "invalid_request_error")
        assert error["param"] == "frobnicate" and "Unrecognized request argument" in error["message"]
        assert len(engine.requests) == before


class TestModelsAndHealth:
    def test_models(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        body = http.get("/v1/models", headers={"X-Tenant-Id": "open"}).json()
        assert body["object"] == "list" and body["data"][0]["id"] == "smollm2-135m-instruct-bf16"
        assert_error(http.get("/v1/models"), 401, "authentication_error")  # per tenant: who is asking?

    def test_health_and_ready(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json()["status"] == "ready"

    def test_corrupt_patch_file_refused_others_serve(self, client: tuple[TestClient, FakeEngine]) -> None:
        http, _ = client
        registry = http.app.state.registry
        assert [r.reason for r in registry.rejections()] == ["bad_format"]
        assert post_chat(http, "locked").status_code == 200
