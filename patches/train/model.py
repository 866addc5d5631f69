"""The trainable patch: PEFT prompt tuning on the frozen base model, and the tensors training needs.

PEFT's prompt tuning puts its virtual tokens in front of the input embeddings, which for one patch is
exactly patchserve's serving layout (``patches.stack``): rows, then the chat-templated prompt. PEFT
also provides the text initialisation (the paper's better init) and keeps the base model frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from patches.chat import encode_chat
from patches.textinit import DEFAULT_INIT_TEXT
from patches.train.config import InitMode, TrainConfig

IGNORE = -100


def load_base(model_dir: Path) -> tuple[Any, Any]:
    """The frozen base model (float32 on CPU) and its tokenizer; no remote code, safetensors only."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    model.eval().requires_grad_(False)
    return model, tokenizer


def make_patch_model(base: Any, model_dir: Path, config: TrainConfig) -> PeftModel:
    """Wrap ``base`` with a trainable ``[n_tokens, hidden]`` prefix (text or random init)."""
    text_init = config.init == InitMode.text
    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=config.n_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text_init else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=(config.init_text or DEFAULT_INIT_TEXT) if text_init else None,
        tokenizer_name_or_path=str(model_dir) if text_init else None,
    )
    return get_peft_model(base, peft_config)


def prefix_parameter(model: PeftModel) -> torch.nn.Parameter:
    """The patch rows being trained."""
    return model.prompt_encoder["default"].embedding.weight


@dataclass(frozen=True)
class Example:
    """One prompt with a response: token ids, and which of them the loss counts."""

    input_ids: list[int]
    response_mask: list[bool]


def make_example(tokenizer: Any, prompt: str, response: str, max_response_tokens: int) -> Example:
    """Chat-templated prompt (as served) + response + end of turn.

    A response of ``max_response_tokens`` or more is cut there and gets no end-of-turn token, so the
    patch never learns to stop long answers early; complete ones (refusals) do learn to end.
    """
    prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    if len(response_ids) >= max_response_tokens:
        response_ids = response_ids[:max_response_tokens]
    else:
        response_ids.append(tokenizer.eos_token_id)
    return Example(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (prompt and padding ignored)."""
    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        ids.append(e.input_ids + [pad_id] * pad)
        mask.append([1] * len(e.input_ids) + [0] * pad)
        labels.append([t if r else IGNORE for t, r in zip(e.input_ids, e.response_mask, strict=True)] + [IGNORE] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], n_prefix: int) -> torch.Tensor:
    """Summed log-probabilities of each example's response tokens; ``n_prefix`` virtual tokens lead the logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, n_prefix:]
    labels = batch["labels"][:, 1:]
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = labels != IGNORE
    picked = torch.gather(logps, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)
