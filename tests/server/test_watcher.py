"""The watcher's catch-up rescan: it runs once the watch is live (nothing falls between the two), and
it does not verify again a file it has already read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.server.test_admin import Env, applied, make_env, start


@pytest.fixture
def env(model_dir: Path, tmp_path: Path) -> Env:
    return make_env(model_dir, tmp_path)


def test_the_catch_up_rescan_reads_only_new_or_changed_files(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    http = start(env.settings())
    try:
        registry = http.app.state.registry
        read: list[str] = []
        original = registry.load_file
        monkeypatch.setattr(registry, "load_file", lambda path: read.append(path.name) or original(path))
        http.app.state.watcher.rescan()
        assert read == []  # start-up read every file already
        (env.patch_dir / "safety-v2.safetensors").write_bytes(env.patch_bytes(2))
        http.app.state.watcher.rescan()
        assert read == ["safety-v2.safetensors"]
        assert applied(http) == "safety@2"
    finally:
        http.__exit__(None, None, None)


def test_a_file_that_arrives_while_the_watcher_catches_up_is_loaded(env: Env) -> None:
    http = start(env.settings())
    try:
        watcher = http.app.state.watcher
        rescan = watcher.rescan

        def rescan_then_a_file_arrives() -> None:
            rescan()
            (env.patch_dir / "safety-v2.safetensors").write_bytes(env.patch_bytes(2))

        watcher.rescan = rescan_then_a_file_arrives

        async def watch_until_loaded() -> bool:
            stop = asyncio.Event()
            task = asyncio.create_task(watcher.run(stop, polling=False))
            deadline = time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    if any(e.patch.version == 2 for e in http.app.state.registry.entries()):
                        return True
                    await asyncio.sleep(0.05)
                return False
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)

        assert asyncio.run(watch_until_loaded()), "a file written after the scan but before the watch was missed"
        assert applied(http) == "safety@2"
    finally:
        http.__exit__(None, None, None)
