"""The control plane: one writer, ledger-backed versions, reload invariants, supervised tasks.

Each test here reproduces a defect that the previous code had (issue 15) over the fake engine.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from patches import rollback
from patches.tenants import hash_api_key
from server.metrics import Metrics
from server.supervisor import Supervisor
from tests.server.test_admin import ADMIN, CHAT, Env, applied, make_env, start, upload

TOKEN = "admin-token-0123456789"


@pytest.fixture
def env(model_dir: Path, tmp_path: Path) -> Env:
    return make_env(model_dir, tmp_path)


def _floors(http: TestClient) -> dict[str, int]:
    return http.get("/admin/patches", headers=ADMIN).json()["version_floors"]


def _full_disk(*_: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


class TestVersions:
    def test_deleting_the_newest_version_a_tenant_follows_is_refused_not_a_silent_rollback(self, env: Env) -> None:
        http = start(env.settings())
        try:
            assert upload(http, env.patch_bytes(2)).status_code == 201
            response = http.delete("/admin/patches/safety/2", headers=ADMIN)
            assert response.status_code == 409 and "rollback API" in response.json()["error"]["message"]
            assert applied(http) == "safety@2"
        finally:
            http.__exit__(None, None, None)

    def test_a_removed_version_cannot_come_back_with_other_content(self, env: Env) -> None:
        http = start(env.settings())
        try:
            assert upload(http, env.patch_bytes(2)).status_code == 201
            (env.patch_dir / "safety-v2.safetensors").unlink()
            http.app.state.watcher.rescan()  # the file is gone: the directory is the truth
            assert applied(http) == "safety@1"
            other = upload(http, env.patch_bytes(2, noise=0.5))
            assert other.status_code == 400 and "other content" in other.json()["error"]["message"]
            assert applied(http) == "safety@1"
        finally:
            http.__exit__(None, None, None)

    def test_concurrent_uploads_of_one_version_admit_exactly_one(
        self, env: Env, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        http = start(env.settings())
        real = rollback.write_atomic

        def slow(path: Path, data: bytes) -> Path:
            time.sleep(0.2)  # widen the old check-then-act window
            return real(path, data)

        monkeypatch.setattr(rollback, "write_atomic", slow)
        bodies = [env.patch_bytes(2), env.patch_bytes(2, noise=0.5)]
        codes: list[int] = []
        try:
            threads = [threading.Thread(target=lambda b=b: codes.append(upload(http, b).status_code)) for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(codes) == [201, 400]
            served = http.get("/admin/patches", headers=ADMIN).json()["patches"]
            assert [p["version"] for p in served] == [1, 2]
        finally:
            http.__exit__(None, None, None)

    def test_a_failed_state_write_is_a_503_and_moves_no_floor(self, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
        http = start(env.settings())
        try:
            monkeypatch.setattr(rollback, "write_atomic", _full_disk)
            response = upload(http, env.patch_bytes(2))
            assert response.status_code == 503 and "No space left" in response.json()["error"]["message"]
            assert _floors(http) == {"safety": 1} and applied(http) == "safety@1"
            assert not (env.patch_dir / "safety-v2.safetensors").exists()
            assert not [p for p in env.patch_dir.iterdir() if p.name.startswith(".")]
            metrics = http.get("/metrics").text
            assert 'patchserve_patch_load_failures_total{reason="state_write"} 1.0' in metrics
        finally:
            http.__exit__(None, None, None)
        monkeypatch.undo()
        http = start(env.settings())  # the failed upload does not go live after a restart either
        try:
            assert _floors(http) == {"safety": 1} and applied(http) == "safety@1"
        finally:
            http.__exit__(None, None, None)

    def test_a_corrupt_state_file_refuses_to_start(self, env: Env) -> None:
        state = env.root / "state"
        state.mkdir()
        (state / "versions.json").write_text("{}")
        http = start_failing(env)
        try:
            assert "refusing to reset" in http.app.state.startup_error
            assert http.get("/readyz").status_code == 503
        finally:
            http.__exit__(None, None, None)

    def test_a_rollback_on_one_replica_reaches_the_other(self, env: Env) -> None:
        one = start(env.settings())
        two = start(env.settings())  # same patch dir, same state dir: two pods on one volume
        try:
            assert upload(one, env.patch_bytes(2)).status_code == 201
            two.app.state.watcher.rescan()
            assert applied(two) == "safety@2"
            assert one.post("/admin/patches/safety/rollback", json={"version": 1}, headers=ADMIN).status_code == 200
            (env.patch_dir / "safety-v2.safetensors").write_bytes(env.patch_bytes(2))  # the file is back
            two.app.state.control.sync_state()
            assert applied(two) == "safety@1"
            two.app.state.watcher.rescan()
            assert applied(two) == "safety@1"  # withdrawn: its file is refused
        finally:
            one.__exit__(None, None, None)
            two.__exit__(None, None, None)


def start_failing(env: Env, **overrides: object) -> TestClient:
    from server.app import create_app
    from server.engine import EngineConfig
    from tests.support import FakeEngine

    async def factory(config: EngineConfig) -> FakeEngine:
        return FakeEngine(config.max_model_len)

    http = TestClient(create_app(env.settings(**overrides), engine_factory=factory))
    http.__enter__()
    deadline = time.monotonic() + 30
    while http.app.state.startup_error is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return http


class TestFiles:
    def test_a_fifo_in_the_patch_dir_is_refused_without_blocking(self, env: Env) -> None:
        os.mkfifo(env.patch_dir / "pipe.safetensors")
        http = start(env.settings())  # start-up reads the directory: a blocking read would hang here
        try:
            rejected = {
                r["source"]: r["reason"] for r in http.get("/admin/patches", headers=ADMIN).json()["rejections"]
            }
            assert rejected == {"pipe.safetensors": "not_a_file"}
        finally:
            http.__exit__(None, None, None)

    def test_symlinks_load_only_inside_the_patch_dir(self, env: Env, tmp_path: Path) -> None:
        outside = tmp_path / "elsewhere.safetensors"
        outside.write_bytes(env.patch_bytes(2))
        (env.patch_dir / "out.safetensors").symlink_to(outside)
        data = env.patch_dir / "..data"
        data.mkdir()
        (data / "safety-v3.safetensors").write_bytes(env.patch_bytes(3))
        (env.patch_dir / "safety-v3.safetensors").symlink_to(Path("..data") / "safety-v3.safetensors")
        http = start(env.settings())
        try:
            rejected = {
                r["source"]: r["reason"] for r in http.get("/admin/patches", headers=ADMIN).json()["rejections"]
            }
            assert rejected == {"out.safetensors": "not_a_file"}
            assert applied(http) == "safety@3"  # a ConfigMap-style link inside the directory loads
        finally:
            http.__exit__(None, None, None)

    def test_a_watcher_restart_catches_up_on_missed_changes(self, env: Env) -> None:
        http = start(env.settings())
        try:
            (env.patch_dir / "safety-v2.safetensors").write_bytes(env.patch_bytes(2))  # no event delivered
            http.app.state.watcher.rescan()
            assert applied(http) == "safety@2"
        finally:
            http.__exit__(None, None, None)


class TestTenantReload:
    def _keys(self, env: Env, keys: dict[str, list[str]]) -> None:
        config = yaml.safe_load(env.tenants_file.read_text())
        for tenant in config["tenants"]:
            tenant["api_keys"] = keys.get(tenant["id"], [])
        env.tenants_file.write_text(yaml.safe_dump(config))

    def test_the_admin_token_cannot_become_a_tenant_key_on_reload(self, env: Env) -> None:
        self._keys(env, {"app": [hash_api_key("app-key-0123456789")]})
        http = start(env.settings())
        try:
            self._keys(env, {"app": [hash_api_key(TOKEN)]})
            result = http.post("/admin/tenants/reload", headers=ADMIN).json()
            assert not result["applied"] and "admin token" in result["error"]
            as_tenant = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {TOKEN}"})
            assert as_tenant.status_code == 401
        finally:
            http.__exit__(None, None, None)

    @pytest.mark.parametrize("dev_mode", [False, True])
    def test_dropping_every_api_key_needs_dev_mode(self, env: Env, dev_mode: bool) -> None:
        self._keys(env, {"app": [hash_api_key("app-key-0123456789")]})
        http = start(env.settings(dev_mode=dev_mode))
        try:
            self._keys(env, {})
            result = http.post("/admin/tenants/reload", headers=ADMIN).json()
            assert result["applied"] is dev_mode
            by_header = http.post("/v1/chat/completions", json=CHAT, headers={"X-Tenant-Id": "app"})
            assert by_header.status_code == (200 if dev_mode else 401)
        finally:
            http.__exit__(None, None, None)


class TestSupervisor:
    def test_a_failing_task_is_counted_restarted_and_reported(self) -> None:
        metrics = Metrics()
        calls: list[int] = []

        async def scenario() -> list[str]:
            stop = asyncio.Event()
            supervisor = Supervisor(metrics, stop, backoff=0.001, unhealthy_after=3)

            async def tick() -> None:
                calls.append(1)
                if len(calls) <= 3:
                    raise OSError(errno.EROFS, "Read-only file system")

            supervisor.every("state-sync", 0.001, tick)
            while len(calls) < 3:
                await asyncio.sleep(0.001)
            problems = supervisor.problems()
            while len(calls) < 5:
                await asyncio.sleep(0.001)
            problems += ["--"] + supervisor.problems()
            await supervisor.close()
            return problems

        problems = asyncio.run(scenario())
        assert problems[0].startswith("background task state-sync keeps failing (3 times in a row)")
        assert problems[-1] == "--"  # healthy again after a good tick
        assert metrics.task_failures.labels("state-sync")._value.get() == 3

    def test_a_long_running_task_that_returns_early_is_restarted(self) -> None:
        metrics = Metrics()
        runs: list[int] = []

        async def scenario() -> None:
            stop = asyncio.Event()
            supervisor = Supervisor(metrics, stop, backoff=0.001)

            async def watcher() -> None:
                runs.append(1)
                if len(runs) < 3:
                    raise RuntimeError("inotify died")
                await stop.wait()

            supervisor.run("watcher", watcher)
            while len(runs) < 3:
                await asyncio.sleep(0.001)
            await supervisor.close()

        asyncio.run(scenario())
        assert len(runs) == 3 and metrics.task_failures.labels("watcher")._value.get() == 2
