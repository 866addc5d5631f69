"""Turning requests into token ids: the model's chat template and tokenizer."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from patches.chat import encode_chat
from server.protocol import ChatMessage


class PromptEncoder:
    """The served model's tokenizer and chat template.

    Args:
        model_dir: Local model directory (tokenizer files and chat template).
        separator: Text of the token placed between stacked patches; must be exactly one token.
    """

    def __init__(self, model_dir: Path, separator: str = "\n") -> None:
        # Security: tokenizers are loaded without remote code.
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        ids = self.tokenizer.encode(separator, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"separator {separator!r} must be exactly one token of the model, got {len(ids)}")
        self.separator_id: int = ids[0]
        self.placeholder_id: int = 0
        # The longest vocabulary entry (added and special tokens included), in characters of its
        # stored form: byte-level BPE stores one character per byte and SentencePiece one per
        # character, so no token decodes to more characters than this (81 for SmolLM2).
        self.max_token_chars: int = max(map(len, self.tokenizer.get_vocab()), default=1)
        # Tokenisation runs in worker threads; transformers' fast tokenizers are not safe to call from
        # several threads at once ("Already borrowed"), so calls are serialised.
        self._lock = threading.Lock()

    def max_chars(self, max_tokens: int) -> int:
        """Most characters a text of at most ``max_tokens`` tokens can have: a longer text cannot fit
        and is refused before it is tokenised. Exact for tokenizers without a shrinking normalizer
        (byte-level BPE such as SmolLM2's has none)."""
        return max_tokens * self.max_token_chars

    def chat(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of the chat-templated conversation, ending with the assistant turn's opening.
        Blocking (CPU-bound): the service calls it in a worker thread."""
        conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        with self._lock:
            return encode_chat(self.tokenizer, conversation)

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text (special tokens written in the text are kept as such). Blocking."""
        with self._lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (for ``echo``). Blocking."""
        with self._lock:
            return str(self.tokenizer.decode(list(ids)))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)
