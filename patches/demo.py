"""Text-initialised patches, and the demo patch ``make run`` serves until a trained patch ships.

:func:`text_patch` builds a valid format-v1 patch whose rows are copied from the embeddings of a
piece of text (the paper's text initialisation), optionally perturbed by seeded noise. The demo patch
``demo-safety`` is such a patch: it exercises the whole serving path, but it was never trained and
is labelled so in its description.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import safe_open
from transformers import AutoTokenizer

from patches.fingerprint import embedding_matrix, fingerprint_model
from patches.format import PatchMetadata, dump_patch, write_atomic
from patches.signing import sign_patch
from patches.stack import Placement
from patches.textinit import DEFAULT_INIT_TEXT, text_init_rows

DEMO_PATCH_NAME = "demo-safety"
DEMO_DESCRIPTION = "DEMO ONLY, untrained: rows copied from the embeddings of a safety instruction"


@functools.lru_cache(maxsize=32)
def _text_rows(model_dir: Path, text: str, n_tokens: int) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return text_init_rows(embedding_matrix(model_dir), tokenizer.encode(text), n_tokens)


def text_patch(
    model_dir: Path,
    name: str,
    *,
    version: int = 1,
    text: str = DEFAULT_INIT_TEXT,
    n_tokens: int = 50,
    noise: float = 0.0,
    seed: int = 0,
    description: str = "",
    key: Ed25519PrivateKey | None = None,
    placement: Placement = Placement.prefix,
) -> bytes:
    """Format-v1 bytes of a text-initialised patch for ``model_dir`` (signed when ``key`` is given).

    Args:
        model_dir: The model the patch is for (its embeddings and fingerprint).
        name: Patch name.
        version: Patch version.
        text: Text whose token embeddings become the rows (trimmed or repeated to ``n_tokens``).
        n_tokens: Number of virtual tokens.
        noise: Standard deviation of seeded Gaussian noise added to the rows.
        seed: Seed of that noise.
        description: Metadata description.
        key: Signing key; None leaves the file unsigned.
        placement: Where the rows go (before the prompt, or after it).
    """
    rows = _text_rows(model_dir, text, n_tokens).clone()
    if noise:
        rows += noise * torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed))
    meta = PatchMetadata(
        name=name,
        version=version,
        base_model=fingerprint_model(model_dir),
        description=description,
        placement=placement,
    )
    data = dump_patch(rows, meta)
    return sign_patch(data, key) if key is not None else data


def write_demo_patch(
    model_dir: Path, patch_dir: Path, *, key: Ed25519PrivateKey | None = None, n_tokens: int = 50
) -> Path:
    """Write ``demo-safety`` for the model in ``model_dir`` into ``patch_dir``, unless it is already there for it."""
    path = patch_dir / f"{DEMO_PATCH_NAME}.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        signed_ok = key is None or meta.get("signature") is not None
        if meta.get("base_model") == fingerprint_model(model_dir) and signed_ok:
            return path
    data = text_patch(model_dir, DEMO_PATCH_NAME, n_tokens=n_tokens, description=DEMO_DESCRIPTION, key=key)
    return write_atomic(path, data)
