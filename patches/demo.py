"""The demo patch ``make run`` serves until a trained patch ships: text-initialised, untrained.

It is a valid format-v1 patch (50 rows copied from the embeddings of a safety instruction), so it
exercises the whole serving path, but it was never trained and is labelled so in its description.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from transformers import AutoTokenizer

from patches.fingerprint import embedding_matrix, fingerprint_model
from patches.format import PatchMetadata, save_patch
from patches.textinit import DEFAULT_INIT_TEXT, text_init_rows

DEMO_PATCH_NAME = "demo-safety"


def write_demo_patch(model_dir: Path, patch_dir: Path, *, n_tokens: int = 50, version: int = 1) -> Path:
    """Write ``demo-safety`` for the model in ``model_dir`` into ``patch_dir``, unless it is already there for it."""
    path = patch_dir / f"{DEMO_PATCH_NAME}.safetensors"
    fingerprint = fingerprint_model(model_dir)
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("base_model") == fingerprint:
                return path
    patch_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = text_init_rows(embedding_matrix(model_dir), tokenizer.encode(DEFAULT_INIT_TEXT), n_tokens)
    meta = PatchMetadata(
        name=DEMO_PATCH_NAME,
        version=version,
        base_model=fingerprint,
        domain="safety",
        description="DEMO ONLY, untrained: rows copied from the embeddings of a safety instruction",
    )
    return save_patch(path, rows, meta)
