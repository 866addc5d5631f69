"""Base-model fingerprints: a patch only makes sense on the exact model it was trained for.

The fingerprint is a SHA-256 over the model's architecture config (canonical JSON, without fields
that do not change the computation) and the raw bytes of its input-embedding matrix. Changing the
embedding matrix or any architecture field changes it; re-saving the same model does not.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

# Config keys that describe provenance or tooling rather than the computation.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_model_name_or_path", "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}
)
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


@dataclass(frozen=True)
class ModelSpec:
    """What a patch must match to be served on a model.

    Attributes:
        fingerprint: ``sha256:<hex>`` of the config and the embedding matrix.
        hidden_size: Width of the input embeddings; a patch's second dimension.
        max_rows: Largest number of virtual tokens one patch may carry.
        dtype: The dtype the engine computes in; patch rows must stay finite when cast to it.
    """

    fingerprint: str
    hidden_size: int
    max_rows: int = 256
    dtype: str = "bfloat16"


def embedding_matrix(model_dir: Path) -> torch.Tensor:
    """The model's input-embedding matrix, read straight from its safetensors files."""
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if key.endswith(_EMBEDDING_SUFFIXES):
                    return f.get_tensor(key)
    raise FileNotFoundError(f"no input-embedding tensor found in the safetensors files of {model_dir.name}")


def model_config(model_dir: Path) -> dict[str, object]:
    """The model's ``config.json`` as a dict."""
    return json.loads((model_dir / "config.json").read_text())


def fingerprint_model(model_dir: Path) -> str:
    """Fingerprint of the model in ``model_dir`` (a local HF model directory with safetensors weights).

    Memoised per directory and file state (names, sizes, modification times), since hashing reads the
    whole embedding matrix.
    """
    files = sorted((model_dir / "config.json", *model_dir.glob("*.safetensors")))
    state = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint(model_dir.resolve(), state)


@functools.lru_cache(maxsize=8)
def _fingerprint(model_dir: Path, _state: tuple[tuple[str, int, int], ...]) -> str:
    config = {k: v for k, v in model_config(model_dir).items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    embedding = embedding_matrix(model_dir).contiguous()
    digest.update(f"{embedding.dtype}{list(embedding.shape)}".encode())
    digest.update(embedding.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def model_spec(model_dir: Path, *, max_rows: int = 256, dtype: str = "bfloat16") -> ModelSpec:
    """Build the :class:`ModelSpec` patches are validated against."""
    hidden = int(model_config(model_dir)["hidden_size"])  # type: ignore[arg-type]
    return ModelSpec(fingerprint=fingerprint_model(model_dir), hidden_size=hidden, max_rows=max_rows, dtype=dtype)
