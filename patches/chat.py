"""The chat prompt a request becomes: the model's chat template, tokenised without extra specials.

Shared by the server (every chat request) and training (every example), so a patch is trained on
exactly the token sequence it is served in front of.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the templated conversation, ending with the opening of the assistant's turn.

    Args:
        tokenizer: A HF tokenizer with a chat template.
        messages: ``[{"role": ..., "content": ...}, ...]``.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(str(text), add_special_tokens=False))
