"""Fixtures for the unit tests of :mod:`patches`: a tiny synthetic model spec and patch-file factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from patches.basemodel import prepare_default_model
from patches.fingerprint import ModelSpec
from patches.format import PatchMetadata, save_patch

HIDDEN = 8
MAX_ROWS = 4
FINGERPRINT = "sha256:" + "ab" * 32
OTHER_FINGERPRINT = "sha256:" + "cd" * 32


@pytest.fixture
def spec() -> ModelSpec:
    """A synthetic model: width 8, at most 4 rows per patch, bfloat16 compute."""
    return ModelSpec(fingerprint=FINGERPRINT, hidden_size=HIDDEN, max_rows=MAX_ROWS)


@pytest.fixture
def make_meta() -> Callable[..., PatchMetadata]:
    """Metadata for the synthetic model with every field set explicitly; keyword overrides."""

    def make(**overrides: object) -> PatchMetadata:
        fields: dict[str, object] = {
            "name": "refusal",
            "version": 3,
            "base_model": FINGERPRINT,
            "domain": "safety",
            "description": "declines harmful requests",
            "created": "2025-01-02T03:04:05Z",
        }
        fields.update(overrides)
        return PatchMetadata(**fields)  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_rows() -> Callable[..., torch.Tensor]:
    """Deterministic random rows ``[n, width]``."""

    def make(n: int = 2, width: int = HIDDEN, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
        return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)).to(dtype)

    return make


@pytest.fixture
def patch_dir(tmp_path: Path) -> Path:
    """An empty patch directory."""
    directory = tmp_path / "patches"
    directory.mkdir()
    return directory


@pytest.fixture
def write_patch(patch_dir: Path, make_meta, make_rows) -> Callable[..., Path]:
    """Write a valid patch file into ``patch_dir``; ``rows`` and metadata fields can be overridden."""

    def write(
        name: str = "refusal", version: int = 1, *, rows: torch.Tensor | None = None, **meta_overrides: object
    ) -> Path:
        meta = make_meta(name=name, version=version, **meta_overrides)
        path = patch_dir / f"{name}-v{version}.safetensors"
        return save_patch(path, make_rows(seed=version) if rows is None else rows, meta)

    return write


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The embedded base model (bf16 safetensors directory), prepared once and cached."""
    return prepare_default_model()


@pytest.fixture(scope="session")
def base(model_dir: Path) -> tuple[Any, Any]:
    """The embedded base model and its tokenizer, loaded once for the tests that run it (fp32, CPU)."""
    from patches.train.model import load_base

    return load_base(model_dir)
