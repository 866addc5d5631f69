"""``patchserve push``, ``status`` and ``rollback`` over real HTTP: the app with a fake engine under
uvicorn on a free loopback port (one thread per replica), driven through the CLI."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from bench.launch import free_port
from patches.cli import app
from server.app import create_app
from server.engine import EngineConfig
from tests.server.test_admin import Env, make_env
from tests.support import FakeEngine

TOKEN = "admin-token-0123456789"


class Replica:
    """One app (fake engine) served by uvicorn in a thread, on ``url``."""

    def __init__(self, env: Env) -> None:
        async def factory(config: EngineConfig) -> FakeEngine:
            return FakeEngine(config.max_model_len)

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(env.settings(), engine_factory=factory)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> Replica:
        self.thread.start()
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "replica did not become ready"
            assert self.app.state.startup_error is None, self.app.state.startup_error
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def replicas(model_dir: Path, tmp_path: Path) -> Iterator[Callable[[int], list[tuple[Replica, Env]]]]:
    """``replicas(n)``: n independent replicas, each with its own patch dir, ledger, signing keys and trust store."""
    started: list[Replica] = []

    def make(n: int) -> list[tuple[Replica, Env]]:
        out = []
        for i in range(n):
            (tmp_path / f"r{i}").mkdir()
            env = make_env(model_dir, tmp_path / f"r{i}")
            replica = Replica(env).start()
            started.append(replica)
            out.append((replica, env))
        return out

    yield make
    for replica in started:
        replica.stop()


@pytest.fixture
def cli() -> Callable[..., object]:
    runner = CliRunner()

    def run(*args: object, code: int = 0, **env: str):
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250", "PATCHSERVE_URL": "", **env})
        assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        return result

    return run


def test_push_uploads_a_signed_patch_and_it_serves(replicas, cli, tmp_path: Path) -> None:
    ((replica, env),) = replicas(1)
    patch = tmp_path / "safety-v2.safetensors"
    patch.write_bytes(env.patch_bytes(2))
    out = cli("push", patch, "--url", replica.url, "--token", TOKEN).output
    assert "pushed safety@2" in out and "sha256:" in out
    assert (env.patch_dir / "safety-v2.safetensors").is_file()


def test_push_of_a_refused_file_names_the_reason(replicas, cli, tmp_path: Path) -> None:
    ((replica, env),) = replicas(1)
    rogue = tmp_path / "rogue.safetensors"
    rogue.write_bytes(env.patch_bytes(2, key=env.rogue_key))
    out = cli("push", rogue, "--url", replica.url, code=1, PATCHSERVE_ADMIN_TOKEN=TOKEN).output
    assert f"push refused: {replica.url}: HTTP 400: [unknown_key]" in out
    assert "Traceback" not in out
    assert not (env.patch_dir / "safety-v2.safetensors").exists()


def test_wrong_or_missing_token_is_a_clear_input_error(replicas, cli, tmp_path: Path) -> None:
    ((replica, env),) = replicas(1)
    patch = tmp_path / "safety-v2.safetensors"
    patch.write_bytes(env.patch_bytes(2))
    out = cli("push", patch, "--url", replica.url, "--token", "wrong-token-0123456789", code=2).output
    assert "HTTP 401" in out and "wrong admin token" in out and "PATCHSERVE_ADMIN_TOKEN" in out
    assert "no admin token" in cli("status", "--url", replica.url, code=2).output
    assert "cannot read" in cli("push", tmp_path / "absent.safetensors", "--url", replica.url, "--token", TOKEN,
                                code=2).output  # fmt: skip


def test_status_shows_every_replica_and_where_they_differ(replicas, cli, tmp_path: Path) -> None:
    (a, env_a), (b, env_b) = replicas(2)
    patch = tmp_path / "safety-v2.safetensors"
    patch.write_bytes(env_a.patch_bytes(2))
    cli("push", patch, "--url", a.url, "--token", TOKEN)
    (env_a.patch_dir / "junk.safetensors").write_bytes(b"not a patch")
    a.app.state.control.file_changed(env_a.patch_dir / "junk.safetensors")  # a refused file (watcher is off)

    out = cli("status", PATCHSERVE_URL=f"{a.url},{b.url}", PATCHSERVE_ADMIN_TOKEN=TOKEN).output
    assert out.count(a.url) >= 4 and out.count(b.url) >= 2  # replica table, patches, floors, refusals
    lines = out.splitlines()
    assert any(a.url in line and "safety@2" in line for line in lines)
    assert not any(b.url in line and "safety@2" in line for line in lines)
    assert any(a.url in line and "junk.safetensors" in line for line in lines)
    assert "replicas differ" in out


def test_status_reports_an_unreachable_replica_and_exits_3(replicas, cli) -> None:
    ((replica, _),) = replicas(1)
    dead = f"http://127.0.0.1:{free_port()}"
    result = cli("status", "--url", replica.url, "--url", dead, "--token", TOKEN, code=3)
    assert f"{dead}: cannot reach" in result.output
    assert any(replica.url in line and "safety@1" in line for line in result.output.splitlines())


def test_rollback_withdraws_newer_versions_and_status_shows_them(replicas, cli, tmp_path: Path) -> None:
    ((replica, env),) = replicas(1)
    patch = tmp_path / "safety-v2.safetensors"
    patch.write_bytes(env.patch_bytes(2))
    cli("push", patch, "--url", replica.url, "--token", TOKEN)
    out = cli("rollback", "safety", 1, "--url", replica.url, "--token", TOKEN).output
    assert "rolled safety back to safety@1" in out and "safety@2" in out

    status = cli("status", "--url", replica.url, "--token", TOKEN).output
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in status.splitlines() if replica.url in line]
    assert [replica.url, "safety", "1", "2"] in rows  # replica, patch, floor, withdrawn

    again = cli("push", patch, "--url", replica.url, "--token", TOKEN, code=1).output
    assert "HTTP 400: [rollback]" in again and "withdrawn by an operator rollback" in again
    missing = cli("rollback", "safety", 7, "--url", replica.url, "--token", TOKEN, code=1).output
    assert "HTTP 404: patch safety@7 is not loaded" in missing


def test_push_and_rollback_talk_to_one_replica(cli, tmp_path: Path) -> None:
    out = cli("rollback", "safety", 1, "--url", "http://a:1,http://b:2", "--token", TOKEN, code=2).output
    assert "rollback talks to one replica" in out and "got 2 URLs" in out
    out = cli("push", tmp_path / "p.safetensors", "--url", "http://a:1", "--url", "http://b:2", code=2,
              PATCHSERVE_ADMIN_TOKEN=TOKEN).output  # fmt: skip
    assert "push talks to one replica" in out
