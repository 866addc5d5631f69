"""Turning requests into token ids: the model's chat template and tokenizer."""

from __future__ import annotations

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

    def chat(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of the chat-templated conversation, ending with the assistant turn's opening."""
        conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        return encode_chat(self.tokenizer, conversation)

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text (special tokens written in the text are kept as such)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)
