"""TenantResolver: its layout cache under concurrent resolve() calls (request threads + the watcher's), and
the domain errors it raises (mapped to HTTP only in server/errors.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
import torch

import server.tenancy as tenancy
from patches.errors import Forbidden, PatchError, PatchNotFound, StackUnavailable, Unauthenticated
from patches.stack import parse_stack
from patches.tenants import TenantConfig, hash_api_key
from server.errors import classify
from server.tenancy import TenantResolver


class _Layout:
    def to(self, dtype: torch.dtype) -> _Layout:
        return self


def _resolver() -> TenantResolver:
    return TenantResolver(cast(Any, None), cast(Any, None), separator_id=0, dtype=torch.float32)


def test_one_layout_per_stack_when_two_threads_compose_it_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    both_composing = threading.Barrier(2, timeout=10)  # breaks (fails the test) if composing held the lock

    def compose(patches: object, *, separator_id: int) -> _Layout:
        both_composing.wait()
        return _Layout()

    monkeypatch.setattr(tenancy, "compose_stack", compose)
    resolver = _resolver()
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: resolver._layout([], ("d1",)), range(2)))
    assert got[0] is got[1]
    assert list(resolver._layouts) == [("d1",)]


def _config_resolver(registry: Any = None) -> TenantResolver:
    config = TenantConfig.model_validate(
        {
            "tenants": [
                {"id": "a", "api_keys": [hash_api_key("key-a")], "default_stack": [], "allowed_patches": ["refusal"]},
            ]
        }
    )
    return TenantResolver(config, registry, separator_id=0, dtype=torch.float32)


@pytest.mark.parametrize(
    ("authorization", "tenant_id", "error", "status"),
    [
        (None, None, Unauthenticated, 401),
        ("Bearer wrong", None, Unauthenticated, 401),
        ("Bearer key-a", "b", Forbidden, 403),
    ],
)
def test_authentication_raises_domain_errors_that_map_to_http_in_one_place(
    authorization: str | None, tenant_id: str | None, error: type[Exception], status: int
) -> None:
    with pytest.raises(error) as info:
        _config_resolver().authenticate(authorization, tenant_id)
    assert isinstance(info.value, PatchError)
    assert classify(info.value)[0] == status


def test_a_patch_outside_the_allow_list_is_forbidden_naming_the_parameter() -> None:
    tenant = _config_resolver().authenticate("Bearer key-a", None)
    with pytest.raises(Forbidden) as info:
        _config_resolver().resolve_refs(tenant, parse_stack("detox"), param="model")
    assert info.value.param == "model"
    assert classify(info.value)[:1] == (403,)


def test_a_missing_default_stack_is_the_servers_fault() -> None:
    class _Empty:
        def resolve_all(self, refs: object) -> list[object]:
            raise PatchNotFound("refusal is not loaded")

    tenant = _config_resolver().authenticate("Bearer key-a", None)
    with pytest.raises(StackUnavailable) as info:
        _config_resolver(_Empty()).resolve_refs(tenant, None)
    assert classify(info.value)[0] == 503


def test_tenancy_does_not_raise_http_errors() -> None:
    source = Path(tenancy.__file__).read_text()
    assert "server.errors" not in source and "APIError" not in source
