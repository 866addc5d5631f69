"""The alternatives a patch is compared with, served by vLLM's own OpenAI server.

* ``lora``: a rank-16 LoRA adapter on every projection of the model (attention and MLP), with random
  non-zero A and B so it changes the output (a zero B would be free to skip). It is a latency
  stand-in, not a trained adapter.
* ``client_embeds``: what a user can build today without patchserve — compute the whole prompt's
  embeddings on the client (patch rows, then the model's own embedding rows of the chat-templated
  prompt: exactly patchserve's layout) and send them to ``/v1/completions`` as ``prompt_embeds``,
  base64 of ``torch.save(tensor)`` (vLLM's ``--enable-prompt-embeds`` API).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from patches.chat import encode_chat
from patches.fingerprint import embedding_matrix
from patches.format import Patch, read_patch
from patches.stack import compose_stack, inputs_embeds

LORA_NAME = "bench-lora16"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora_adapter(model_dir: Path, out_dir: Path, *, rank: int = 16, seed: int = 0) -> Path:
    """Write a PEFT LoRA adapter (rank ``rank``, random non-zero A and B) for ``model_dir`` to ``out_dir``."""
    if (out_dir / "adapter_config.json").is_file():
        config = json.loads((out_dir / "adapter_config.json").read_text())
        if config.get("r") == rank and config.get("base_model_name_or_path") == str(model_dir):
            return out_dir
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    # init_lora_weights=False: A and B both random, so the adapter is never a no-op.
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    return out_dir


def lora_support() -> tuple[bool, str]:
    """Whether the installed vLLM routes LoRA to a kernel on this platform (checked again by running it)."""
    try:
        from vllm.platforms import current_platform
    except Exception as exc:  # noqa: BLE001 - any import failure means "not supported here"
        return False, f"vllm import failed: {exc}"
    wrapper = current_platform.get_punica_wrapper()
    return bool(wrapper), f"{type(current_platform).__name__} LoRA kernels: {wrapper}"


class ClientEmbedder:
    """Client-side prompt embeddings: ``[patch rows][embedding rows of the chat-templated prompt]``.

    Args:
        model_dir: The served model (tokenizer, chat template and input-embedding matrix).
        patch_files: Patch files to put in front, in stack order (one separator token between two).
        separator: Text of the separator token (patchserve's default ``"\\n"``).
    """

    def __init__(self, model_dir: Path, patch_files: list[Path], separator: str = "\n") -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        weight = embedding_matrix(model_dir)
        self.embedding = torch.nn.Embedding.from_pretrained(weight, freeze=True)
        patches = []
        for path in patch_files:
            meta, rows, _ = read_patch(path.read_bytes())
            patches.append(Patch(meta, rows.to(weight.dtype), digest=""))
        (separator_id,) = self.tokenizer.encode(separator, add_special_tokens=False)
        self.layout = compose_stack(patches, separator_id=separator_id)

    def embeds(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """``[patch rows + prompt tokens, hidden]`` in the model's dtype, laid out as the server does."""
        ids = encode_chat(self.tokenizer, messages)
        with torch.no_grad():
            return inputs_embeds(self.layout, ids, self.embedding)

    def payload(self, messages: list[dict[str, str]]) -> str:
        """The ``prompt_embeds`` field: base64 of ``torch.save`` of :meth:`embeds`."""
        buffer = io.BytesIO()
        torch.save(self.embeds(messages).contiguous(), buffer)
        return base64.b64encode(buffer.getvalue()).decode()
