"""Session-wide fixtures: the prepared embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest

from patches.basemodel import prepare_default_model


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The embedded default model as a bf16 safetensors directory (converted once, then cached)."""
    return prepare_default_model()
