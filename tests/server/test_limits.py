"""Unbounded input: body-size limits (chunked or not), prompt-length checks before tokenising,
tokenising off the event loop, and invalid Unicode in text fields."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.server.test_api import CHAT, assert_error, post_chat
from tests.support import FakeEngine

KIB = 1024
CHUNK = b"x" * (16 * KIB)
ADMIN_TOKEN = "admin-token-0123456789"
OPEN = {"X-Tenant-Id": "open", "content-type": "application/json"}
MakeClient = Callable[..., tuple[TestClient, FakeEngine]]


def post_streamed(
    http: TestClient, path: str, parts: Iterable[bytes], headers: dict[str, str] | None = None
) -> tuple[httpx.Response, int]:
    """POST ``parts`` as a streamed body (chunked unless ``headers`` set a Content-Length), straight to
    the app in its own event loop: the app pulls each part when it reads. Returns the response and
    how many parts the app pulled."""
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for part in parts:
            pulled += 1
            yield part

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=http.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post(path, content=body(), headers=headers or {})

    assert http.portal is not None
    response = http.portal.call(post)
    return response, pulled


class TestRequestBodyLimit:
    @pytest.fixture(scope="class")
    def http(self, make_client: MakeClient) -> TestClient:
        return make_client(max_request_bytes=64 * KIB)[0]

    @pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
    def test_chunked_body_over_limit_is_413_before_auth_and_not_read(self, http: TestClient, path: str) -> None:
        # No tenant header: the size refusal comes before authentication (and before JSON parsing).
        response, pulled = post_streamed(http, path, itertools.repeat(CHUNK, 320))  # 5 MiB offered
        assert "content-length" not in response.request.headers
        assert "larger than 65536 bytes" in assert_error(response, 413, "invalid_request_error")["message"]
        assert pulled <= 64 // 16 + 1  # stopped at the chunk that passed the limit

    def test_declared_length_over_limit_is_refused_unread(self, http: TestClient) -> None:
        headers = {**OPEN, "Content-Length": str(10 * 1024 * KIB)}
        response, pulled = post_streamed(http, "/v1/chat/completions", itertools.repeat(CHUNK, 640), headers)
        assert_error(response, 413, "invalid_request_error")
        assert pulled == 0

    def test_chunked_body_under_limit_is_served(self, http: TestClient) -> None:
        data = json.dumps(CHAT).encode()
        response, pulled = post_streamed(http, "/v1/chat/completions", [data[:10], data[10:]], OPEN)
        assert response.status_code == 200, response.text
        assert pulled == 2


class TestUploadLimit:
    @pytest.fixture(scope="class")
    def http(self, make_client: MakeClient) -> TestClient:
        client, _ = make_client(admin_token=ADMIN_TOKEN, max_request_bytes=64 * KIB, max_upload_bytes=256 * KIB)
        return client

    def upload(self, http: TestClient, parts: Iterable[bytes]) -> tuple[httpx.Response, int]:
        return post_streamed(http, "/admin/patches", parts, {"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def test_chunked_upload_over_limit_is_413_and_not_buffered(self, http: TestClient) -> None:
        response, pulled = self.upload(http, itertools.repeat(CHUNK, 64 * 1000))  # 1000 MiB offered
        assert "content-length" not in response.request.headers
        error = assert_error(response, 413, "invalid_request_error")
        assert "patch upload larger than 262144 bytes" in error["message"]
        assert pulled <= 256 // 16 + 1

    def test_upload_limit_not_the_request_limit_applies(self, http: TestClient) -> None:
        # 128 KiB: over max_request_bytes, under max_upload_bytes, so it reaches the patch checks.
        response, pulled = self.upload(http, itertools.repeat(CHUNK, 8))
        assert_error(response, 400, "invalid_request_error")
        assert pulled == 8


class TestPromptLength:
    @pytest.fixture(scope="class")
    def small(self, make_client: MakeClient) -> TestClient:
        return make_client(max_model_len=64)[0]

    @pytest.fixture
    def calls(self, small: TestClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """Names of the tokenizer calls made during the test."""
        encoder, made = small.app.state.encoder, []
        for name in ("chat", "encode", "decode"):
            if (real := getattr(encoder, name, None)) is not None:
                monkeypatch.setattr(encoder, name, lambda *a, _n=name, _f=real: made.append(_n) or _f(*a))
        real_decode = encoder.tokenizer.decode
        monkeypatch.setattr(encoder.tokenizer, "decode", lambda *a, **k: made.append("decode") or real_decode(*a, **k))
        return made

    @pytest.mark.parametrize(("path", "param"), [("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")])
    def test_text_too_long_for_any_tokenisation_is_refused_untokenised(
        self, small: TestClient, calls: list[str], path: str, param: str
    ) -> None:
        longest_token = max(map(len, small.app.state.encoder.tokenizer.get_vocab()))  # 81 characters
        text = "a" * (64 * longest_token + 1)  # no tokenisation of this fits in 64 tokens
        body = {"messages": [{"role": "user", "content": text}]} if param == "messages" else {"prompt": text}
        error = assert_error(small.post(path, json=body, headers=OPEN), 400, "invalid_request_error", param)
        assert error["code"] == "context_length_exceeded" and "maximum context length is 64" in error["message"]
        assert calls == []

    def test_bound_allows_long_tokens(self, make_client: MakeClient) -> None:
        # 5040 characters are only 79 tokens here (long "#" tokens): a prompt this long still fits in 128.
        http, _ = make_client(max_model_len=128)
        response = http.post("/v1/completions", json={"prompt": "#" * 5040, "max_tokens": 4}, headers=OPEN)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] < 124

    def test_token_list_longer_than_context_is_refused_before_any_work(
        self, small: TestClient, calls: list[str]
    ) -> None:
        body = {"prompt": [1] * 100_000 + [10**9], "echo": True}
        error = assert_error(small.post("/v1/completions", json=body, headers=OPEN), 400, "invalid_request_error")
        assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
        assert calls == []

    def test_tokenising_does_not_stall_the_event_loop(self, small: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
        encoder = small.app.state.encoder
        real, entered, release, seen = encoder.encode, threading.Event(), threading.Event(), {}

        def slow_encode(text: str) -> list[int]:
            entered.set()
            seen["timed_out"] = not release.wait(10)
            return real(text)

        monkeypatch.setattr(encoder, "encode", slow_encode)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(small.post, "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=OPEN)
            assert entered.wait(10)
            health = small.get("/healthz")  # served while the tokenisation is still blocked
            release.set()
            assert pending.result().status_code == 200
        assert health.status_code == 200 and seen == {"timed_out": False}


class TestInvalidUnicode:
    @pytest.mark.parametrize(
        ("path", "body", "param"),
        [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
                "messages.0.content",
            ),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]},
                "messages.0.name",
            ),
            ("/v1/chat/completions", {**CHAT, "stop": "\ud800"}, "stop"),
            ("/v1/chat/completions", {**CHAT, "stop": ["ok", "x\udc00"]}, "stop"),
            ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}, "prompt"),
            ("/v1/completions", {"prompt": ["\ud800"], "max_tokens": 2}, "prompt"),
            ("/v1/completions", {"prompt": "ok", "stop": "\ud800", "max_tokens": 2}, "stop"),
        ],
    )
    def test_lone_surrogate_is_400_naming_the_field(
        self, client: tuple[TestClient, FakeEngine], path: str, body: dict, param: str
    ) -> None:
        http, _ = client
        data = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a \ud800 escape
        error = assert_error(http.post(path, content=data, headers=OPEN), 400, "invalid_request_error")
        assert error["param"] == param
        assert "surrogate" in error["message"]
        assert post_chat(http).status_code == 200
