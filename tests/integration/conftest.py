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
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file

from bench.launch import running_server
from patches.signing import generate_keypair, load_private_key
from tests.support import write_patch

ADMIN_TOKEN = "integration-admin-token-0123"
TENANTS = {
    "tenants": [
        {"id": "bare", "default_stack": [], "allowed_patches": ["alpha", "beta"], "allow_unpatched": True},
        {"id": "single", "default_stack": ["alpha"], "allowed_patches": ["alpha"]},
        {"id": "stacked", "default_stack": ["alpha", "beta"], "allowed_patches": ["alpha", "beta", "wide"]},
        {"id": "hot", "default_stack": ["hot"], "allowed_patches": ["hot"]},
    ]
}


@dataclass
class RunningServer:
    url: str
    patch_dir: Path
    log_path: Path
    key: Ed25519PrivateKey
    model_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def engine_env(root: Path, model_dir: Path, patch_dir: Path, tenants_file: Path) -> dict[str, str]:
    return {
        "PATCHSERVE_MODEL": str(model_dir),
        "PATCHSERVE_PATCH_DIR": str(patch_dir),
        "PATCHSERVE_TENANTS_FILE": str(tenants_file),
        "PATCHSERVE_TRUST_DIR": str(root / "trust"),
        "PATCHSERVE_STATE_DIR": str(root / "state"),
        "PATCHSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
        "PATCHSERVE_ENFORCE_EAGER": "true",
        "PATCHSERVE_DTYPE": "float32",
        "PATCHSERVE_GPU_MEMORY_UTILIZATION": "0.3",
        "PATCHSERVE_MAX_MODEL_LEN": "1024",
        "PATCHSERVE_MAX_NUM_SEQS": "32",
    }


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("server")
    patch_dir = root / "patches"
    private, public = generate_keypair(root / "keys", "test-signer")
    (root / "trust").mkdir()
    (root / "trust" / public.name).write_bytes(public.read_bytes())
    key = load_private_key(private)
    write_patch(model_dir, patch_dir, "alpha", n_tokens=12, noise=0.01, seed=1, key=key)
    write_patch(model_dir, patch_dir, "beta", n_tokens=8, noise=0.01, seed=2, key=key)
    write_patch(model_dir, patch_dir, "hot", n_tokens=50, noise=0.01, seed=3, key=key)
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
    log_path = root / "server.log"
    with running_server(engine_env(root, model_dir, patch_dir, tenants_file), log_path) as url:
        yield RunningServer(url, patch_dir, log_path, key, model_dir)
