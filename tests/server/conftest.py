"""API tests against the real app with a :class:`FakeEngine` (no vLLM, runs in seconds)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from patches.tenants import hash_api_key
from server.app import create_app
from server.engine import EngineConfig
from server.settings import Settings
from tests.support import FakeEngine, write_patch

TENANTS = {
    "tenants": [
        {"id": "open", "default_stack": [], "allowed_patches": ["alpha", "beta"], "allow_unpatched": True},
        {"id": "locked", "default_stack": ["alpha"], "allowed_patches": ["alpha"]},
        {"id": "stacked", "default_stack": ["alpha", "beta@1"], "allowed_patches": ["alpha", "beta"]},
    ]
}


@pytest.fixture(scope="session")
def patch_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("patches")
    write_patch(model_dir, directory, "alpha", n_tokens=12)
    write_patch(model_dir, directory, "beta", version=1, n_tokens=8)
    write_patch(model_dir, directory, "beta", version=2, n_tokens=10)
    (directory / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not valid json}")
    return directory


def _wait_started(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    state = client.app.state
    while state.service is None and state.startup_error is None:
        assert time.monotonic() < deadline, "app start-up did not finish"
        time.sleep(0.02)
    assert state.startup_error is None, state.startup_error


@pytest.fixture(scope="module")
def make_client(
    model_dir: Path, patch_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., tuple[TestClient, FakeEngine]]]:
    """Factory: ``make_client(tenants=..., max_model_len=..., **settings)`` → a ready client and its fake engine."""
    clients: list[TestClient] = []
    tmp_path = tmp_path_factory.mktemp("tenants")

    def make(
        tenants: dict | None = None, max_model_len: int = 256, **overrides: object
    ) -> tuple[TestClient, FakeEngine]:
        tenants_file = tmp_path / f"tenants{len(clients)}.yaml"
        tenants_file.write_text(yaml.safe_dump(tenants or TENANTS))
        settings = Settings(
            model=model_dir,
            patch_dir=patch_dir,
            tenants_file=tenants_file,
            max_model_len=max_model_len,
            allow_unsigned=True,
            dev_mode=True,
            watch=False,
            state_dir=tmp_path / f"state{len(clients)}",
            **{"overhead_sample_rate": 0.0, **overrides},  # replays would interleave with engine.requests
        )
        engine = FakeEngine()

        async def factory(config: EngineConfig) -> FakeEngine:
            engine.max_model_len = config.max_model_len
            return engine

        client = TestClient(create_app(settings, engine_factory=factory))
        client.__enter__()
        clients.append(client)
        _wait_started(client)
        return client, engine

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(make_client: Callable[..., tuple[TestClient, FakeEngine]]) -> tuple[TestClient, FakeEngine]:
    """One ready app with the default tenants, shared by a module's tests."""
    return make_client()


KEYED_TENANTS = {
    "tenants": [
        {"id": "acme", "default_stack": ["alpha"], "allowed_patches": ["alpha"], "api_keys": [hash_api_key("sk-acme")]},
        {
            "id": "globex",
            "default_stack": [],
            "allowed_patches": [],
            "allow_unpatched": True,
            "api_keys": [hash_api_key("sk-globex")],
        },
    ]
}
