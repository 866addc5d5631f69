"""Patch rows initialised from the embeddings of human-readable text (the paper's text init).

As in PEFT's ``PromptTuningInit.TEXT``: tokenise the text, then trim or repeat the token ids to exactly
``n_tokens`` and copy their embedding rows (detached, float32).
"""

from __future__ import annotations

import math

import torch

DEFAULT_INIT_TEXT = (
    "You are a careful, honest assistant. Decline requests that could cause harm, such as weapons, "
    "crime, abuse, hate or self-harm, briefly and politely, and help fully with everything else."
)


def text_init_ids(token_ids: list[int], n_tokens: int) -> list[int]:
    """Trim or repeat ``token_ids`` to exactly ``n_tokens`` ids."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    if not token_ids:
        raise ValueError("init text tokenised to nothing; give a non-empty init text")
    if len(token_ids) >= n_tokens:
        return token_ids[:n_tokens]
    return (token_ids * math.ceil(n_tokens / len(token_ids)))[:n_tokens]


def text_init_rows(embedding: torch.Tensor, token_ids: list[int], n_tokens: int) -> torch.Tensor:
    """``[n_tokens, hidden]`` float32 rows copied from ``embedding`` (the model's input-embedding matrix)."""
    ids = torch.tensor(text_init_ids(token_ids, n_tokens), dtype=torch.long)
    return embedding[ids].detach().to(torch.float32).clone()
