"""One real patchserve process (real vLLM engine, eager, float32) per test session, over real HTTP.

float32 keeps the engine and the HF reference numerically comparable, so greedy outputs can be
required to match token for token.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.support import write_patch

START_TIMEOUT_S = 600
TENANTS = {
    "tenants": [
        {"id": "bare", "default_stack": [], "allowed_patches": ["alpha", "beta"], "allow_unpatched": True},
        {"id": "single", "default_stack": ["alpha"], "allowed_patches": ["alpha"]},
        {"id": "stacked", "default_stack": ["alpha", "beta"], "allowed_patches": ["alpha", "beta", "wide"]},
    ]
}


@dataclass
class RunningServer:
    url: str
    patch_dir: Path
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine_env(model_dir: Path, patch_dir: Path, tenants_file: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "PATCHSERVE_MODEL": str(model_dir),
        "PATCHSERVE_HOST": "127.0.0.1",
        "PATCHSERVE_PORT": str(port),
        "PATCHSERVE_PATCH_DIR": str(patch_dir),
        "PATCHSERVE_TENANTS_FILE": str(tenants_file),
        "PATCHSERVE_ENFORCE_EAGER": "true",
        "PATCHSERVE_DTYPE": "float32",
        "PATCHSERVE_GPU_MEMORY_UTILIZATION": "0.3",
        "PATCHSERVE_MAX_MODEL_LEN": "1024",
        "PATCHSERVE_MAX_NUM_SEQS": "32",
    }


def wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=2)
        except httpx.TransportError:
            ready = None
        if ready is not None and ready.status_code == 200:
            return
        if ready is not None and "start-up failed" in ready.text:
            raise RuntimeError(f"server start-up failed: {ready.text}\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("server")
    patch_dir = root / "patches"
    write_patch(model_dir, patch_dir, "alpha", n_tokens=12, noise=0.01, seed=1)
    write_patch(model_dir, patch_dir, "beta", n_tokens=8, noise=0.01, seed=2)
    # Two files the server must refuse while it keeps serving the rest.
    (patch_dir / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    save_file(
        {"patch": torch.zeros(4, 64)},
        str(patch_dir / "wide.safetensors"),
        metadata={
            "format": "patchserve.patch/v1",
            "name": "wide",
            "version": "1",
            "base_model": "x",
            "domain": "safety",
            "description": "wrong width",
            "created": "2026-01-01T00:00:00Z",
        },
    )
    tenants_file = root / "tenants.yaml"
    tenants_file.write_text(yaml.safe_dump(TENANTS))
    port = free_port()
    log_path = root / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=engine_env(model_dir, patch_dir, tenants_file, port),
        )
    running = RunningServer(f"http://127.0.0.1:{port}", patch_dir, log_path, process)
    try:
        wait_ready(running.url, process, log_path)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
