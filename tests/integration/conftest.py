"""One real patchserve process (real vLLM engine, eager, float32) per test session, over real HTTP.

float32 keeps the engine and the HF reference numerically comparable, so greedy outputs can be
required to match token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file

from bench.launch import prepare_root, running_server, server_env
from patches.stack import Placement
from tests.support import write_patch

ADMIN_TOKEN = "integration-admin-token-0123"
TENANTS = {
    "tenants": [
        {"id": "bare", "default_stack": [], "allowed_patches": ["alpha", "beta"], "allow_unpatched": True},
        {"id": "single", "default_stack": ["alpha"], "allowed_patches": ["alpha"]},
        {"id": "stacked", "default_stack": ["alpha", "beta"], "allowed_patches": ["alpha", "beta", "wide"]},
        {"id": "suffixed", "default_stack": ["omega"], "allowed_patches": ["omega", "alpha"]},
        {"id": "mixed", "default_stack": ["alpha", "omega"], "allowed_patches": ["alpha", "omega"]},
        {"id": "hot", "default_stack": ["hot"], "allowed_patches": ["hot"]},
        {"id": "replica", "default_stack": [], "allowed_patches": ["shared"], "allow_unpatched": True},
    ]
}


@dataclass
class RunningServer:
    url: str
    root: Path
    patch_dir: Path
    log_path: Path
    key: Ed25519PrivateKey
    model_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("server")
    patch_dir = root / "patches"
    key = prepare_root(root, TENANTS["tenants"], signer="test-signer")
    write_patch(model_dir, patch_dir, "alpha", n_tokens=12, noise=0.01, seed=1, key=key)
    write_patch(model_dir, patch_dir, "beta", n_tokens=8, noise=0.01, seed=2, key=key)
    write_patch(model_dir, patch_dir, "hot", n_tokens=50, noise=0.01, seed=3, key=key)
    write_patch(model_dir, patch_dir, "omega", n_tokens=10, noise=0.01, seed=4, key=key, placement=Placement.suffix)
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
    log_path = root / "server.log"
    env = server_env(
        root,
        model_dir,
        admin_token=ADMIN_TOKEN,
        enforce_eager="true",
        dtype="float32",
        gpu_memory_utilization=0.3,
        max_model_len=1024,
        max_num_seqs=32,
        overhead_sample_rate=1.0,  # test_prometheus needs overhead samples; replays never change outputs
    )
    with running_server(env, log_path) as url:
        yield RunningServer(url, root, patch_dir, log_path, key, model_dir)
