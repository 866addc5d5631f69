"""``model`` selects a patch stack, and ``/v1/models`` lists them per tenant (issue 16, item 2).

The SDK tests use the real ``openai`` client with nothing but ``base_url``, ``api_key`` and ``model``:
no custom headers at all. It reaches the app in-process (Starlette's test client for the sync SDK,
httpx's ASGI transport for the async one), over a fake engine.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from patches.tenants import hash_api_key
from tests.server.test_api import CHAT, assert_error
from tests.support import FakeEngine

BASE = "smollm2-135m-instruct-bf16"
MESSAGES = CHAT["messages"]
TENANTS = {
    "tenants": [
        {
            "id": "acme",
            "default_stack": ["alpha"],
            "allowed_patches": ["alpha", "beta"],
            "allow_unpatched": True,
            "api_keys": [hash_api_key("sk-acme")],
        },
        {"id": "globex", "default_stack": [], "allowed_patches": ["beta"], "api_keys": [hash_api_key("sk-globex")]},
    ]
}


@pytest.fixture(scope="module")
def keyed(make_client: Callable[..., tuple[TestClient, FakeEngine]]) -> tuple[TestClient, FakeEngine]:
    return make_client(tenants=TENANTS)


def sdk(http: TestClient, key: str = "sk-acme") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def post(http: TestClient, body: dict, key: str = "sk-acme", path: str = "/v1/chat/completions", **headers: str):
    return http.post(path, json=body, headers={"Authorization": f"Bearer {key}", **headers})


class TestOpenAISDK:
    def test_plain(self, keyed: tuple[TestClient, FakeEngine]) -> None:
        http, engine = keyed
        client = sdk(http)
        raw = client.chat.completions.with_raw_response.create(model=f"{BASE}:beta@1", messages=MESSAGES, max_tokens=3)
        completion = raw.parse()
        assert raw.headers["X-Patch-Applied"] == "beta@1"
        assert completion.model == f"{BASE}:beta@1"  # the exact versions, like a dated snapshot
        assert completion.choices[0].message.content == " P8 w1 w2"
        assert engine.requests[-1].layout is not None and len(engine.requests[-1].layout) == 8
        default = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2)
        assert default.model == f"{BASE}:alpha@1" and default.choices[0].message.content == " P12 w1"
        bare = client.completions.create(model=f"{BASE}:none", prompt="Once upon", max_tokens=2)
        assert bare.model == BASE and bare.choices[0].text == " P0 w1"

    def test_streaming(self, keyed: tuple[TestClient, FakeEngine]) -> None:
        http, _ = keyed
        stream = sdk(http).chat.completions.create(
            model=f"{BASE}:alpha+beta",
            messages=MESSAGES,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert {c.model for c in chunks} == {f"{BASE}:alpha@1+beta@2"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " P23 w1 w2"  # 12 + 1 + 10
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3

    async def test_async_plain_and_streaming(self, keyed: tuple[TestClient, FakeEngine]) -> None:
        http, _ = keyed
        transport = httpx.ASGITransport(app=http.app)
        async with httpx.AsyncClient(transport=transport) as async_http:
            client = openai.AsyncOpenAI(
                base_url="http://testserver/v1", api_key="sk-acme", http_client=async_http, max_retries=0
            )
            completion = await client.chat.completions.create(model=f"{BASE}:beta", messages=MESSAGES, max_tokens=2)
            assert completion.model == f"{BASE}:beta@2" and completion.choices[0].message.content == " P10 w1"
            stream = await client.completions.create(model=f"{BASE}:beta@1", prompt="Hi", max_tokens=2, stream=True)
            texts = [c.choices[0].text async for c in stream if c.choices]
            assert "".join(texts) == " P8 w1"
            models = await client.models.list()
            assert f"{BASE}:alpha@1" in [m.id for m in models.data]

    def test_models_per_tenant(self, keyed: tuple[TestClient, FakeEngine]) -> None:
        http, _ = keyed
        acme = {m.id: m for m in sdk(http).models.list().data}
        assert list(acme) == [
            BASE,
            f"{BASE}:alpha",
            f"{BASE}:none",
            f"{BASE}:alpha@1",
            f"{BASE}:beta",
            f"{BASE}:beta@1",
            f"{BASE}:beta@2",
        ]
        assert acme[BASE].parent is None and acme[BASE].model_extra["patches"] == ["alpha@1"]
        assert acme[f"{BASE}:none"].parent == BASE and acme[f"{BASE}:none"].model_extra["patches"] == []
        assert acme[f"{BASE}:beta"].parent == BASE and acme[f"{BASE}:beta"].model_extra["patches"] == ["beta@2"]
        assert acme[f"{BASE}:beta@1"].model_extra["patches"] == ["beta@1"]
        globex = [m.id for m in sdk(http, "sk-globex").models.list().data]
        assert globex == [BASE, f"{BASE}:beta", f"{BASE}:beta@1", f"{BASE}:beta@2"]  # no alpha, no none

    def test_refusals_are_sdk_errors(self, keyed: tuple[TestClient, FakeEngine]) -> None:
        http, _ = keyed
        with pytest.raises(openai.PermissionDeniedError) as forbidden:
            sdk(http, "sk-globex").chat.completions.create(model=f"{BASE}:alpha", messages=MESSAGES, max_tokens=1)
        assert forbidden.value.body["param"] == "model"
        with pytest.raises(openai.NotFoundError) as unknown:
            sdk(http).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1)
        assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["param"] == "model"
        with pytest.raises(openai.AuthenticationError):
            sdk(http, "sk-nobody").models.list()


class TestPrecedence:
    @pytest.mark.parametrize(
        ("model", "header", "applied"),
        [
            (f"{BASE}:beta@1", None, "beta@1"),
            (f"{BASE}:beta@1", "beta@1", "beta@1"),  # the same stack in both: fine
            (BASE, "beta@1", "beta@1"),  # no stack in model: the header decides
            (None, "beta", "beta@2"),
            (None, None, "alpha@1"),  # neither: the tenant's default
            (f"{BASE}:none", None, "none"),
            (f"{BASE}:beta@1+alpha", None, "beta@1+alpha@1"),
        ],
    )
    def test_model_then_header_then_default(
        self, keyed: tuple[TestClient, FakeEngine], model: str | None, header: str | None, applied: str
    ) -> None:
        http, _ = keyed
        body = {**CHAT, **({"model": model} if model else {})}
        response = post(http, body, **({"X-Patch-Stack": header} if header else {}))
        assert response.status_code == 200, response.text
        assert response.headers["X-Patch-Applied"] == applied

    def test_conflict_with_header_is_400(self, keyed: tuple[TestClient, FakeEngine]) -> None:
        http, _ = keyed
        for header in ("beta@2", "beta", "none"):
            response = post(http, {**CHAT, "model": f"{BASE}:beta@1"}, **{"X-Patch-Stack": header})
            assert "select different stacks" in assert_error(response, 400, "invalid_request_error", "model")["message"]

    @pytest.mark.parametrize(
        ("model", "status", "type_"),
        [
            (f"{BASE}:alpha,beta", 400, "invalid_request_error"),
            (f"{BASE}:Alpha", 400, "invalid_request_error"),
            (f"{BASE}:", 400, "invalid_request_error"),
            (f"{BASE}:alpha+alpha", 400, "invalid_request_error"),
            (f"{BASE}:beta@9", 404, "not_found_error"),
            (f"{BASE}-other:alpha", 404, "not_found_error"),
        ],
    )
    def test_bad_model_values(self, keyed: tuple[TestClient, FakeEngine], model: str, status: int, type_: str) -> None:
        http, _ = keyed
        error = assert_error(post(http, {**CHAT, "model": model}), status, type_)
        assert error["param"] in ("model", None)

    def test_none_needs_allow_unpatched(self, keyed: tuple[TestClient, FakeEngine]) -> None:
        http, _ = keyed
        response = post(http, {**CHAT, "model": f"{BASE}:none"}, key="sk-globex")
        assert_error(response, 403, "permission_error", "model")

    def test_same_stack_same_cache_salt_whichever_way_selected(self, keyed: tuple[TestClient, FakeEngine]) -> None:
        http, engine = keyed
        post(http, {**CHAT, "model": f"{BASE}:beta@1"})
        by_model = engine.requests[-1].cache_salt
        post(http, CHAT, **{"X-Patch-Stack": "beta@1"})
        assert engine.requests[-1].cache_salt == by_model
        post(http, {**CHAT, "model": f"{BASE}:beta@1"}, key="sk-globex")
        assert engine.requests[-1].cache_salt != by_model  # never shared across tenants

    def test_completions_select_by_model(self, keyed: tuple[TestClient, FakeEngine]) -> None:
        http, _ = keyed
        response = post(http, {"model": f"{BASE}:beta@1", "prompt": "Hi", "max_tokens": 1}, path="/v1/completions")
        assert response.headers["X-Patch-Applied"] == "beta@1" and response.json()["model"] == f"{BASE}:beta@1"
