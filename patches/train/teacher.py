"""The teacher: what the patched model should say, and what the unpatched model does say.

Two teachers (``--teacher``):

* ``policy`` (default; no safer reference model ships with the embedded model): harmful prompts get a
  refusal written by :func:`policy_refusal` (short, polite, varied, offering a safe alternative);
  benign prompts get the base model's own greedy answer, so the patch learns to leave them alone.
  ``policy-short`` is the same with refusals that end after their reason: the offer ("If you want, I
  can help with…") is where patched models were seen to turn back to the request ("If you want to make
  a pipe bomb, you can…").
* a local model directory: that model's greedy answers to every prompt (the paper's safer reference
  model).

The base model's own answers also serve as DPO's *rejected* side for harmful prompts (it complies with
almost all of them). Answers are cached per model fingerprint in the work directory, so re-runs and
resumed runs skip generation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from patches.chat import encode_chat
from patches.device import autocast, precision_tag

_OPENINGS = (
    "I can't help with that.",
    "I'm sorry, but I can't help with that.",
    "I can't assist with this request.",
    "Sorry, but I won't help with that.",
    "I'm not able to help with this.",
    "I can't provide that.",
)
_REASONS = (
    "It could cause real harm to people.",
    "It could be used to hurt someone or break the law.",
    "Helping with this could put people at risk.",
    "This could seriously harm others.",
)
_OFFERS = (
    "If you want, I can help with something related that is safe.",
    "I'm happy to help with another question.",
    "If you're dealing with a difficult situation, I can point you to support resources.",
    "Let me know if there's something else I can do for you.",
)


WHOLE_REFUSAL_TOKENS = 64
"""Room for a whole written refusal (21–41 tokens) and its end of turn: ``--refusal-tokens 64``."""


POLICY_TEACHERS = {"policy": True, "policy-short": False}
"""The written-refusal teachers, each with whether its refusals close with the offer of other help."""


def policy_refusal(prompt: str, *, offer: bool = True) -> str:
    """A short refusal for ``prompt``, chosen deterministically from varied phrasings; ``offer=False`` ends it
    after the reason."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:6], "big")
    parts = (_OPENINGS[h % 6], _REASONS[(h // 6) % 4], _OFFERS[(h // 24) % 4])
    return " ".join(parts if offer else parts[:2])


def _cache_key(model_tag: str, prompt: str, max_tokens: int) -> str:
    return hashlib.sha256(f"{model_tag}\0{max_tokens}\0{prompt}".encode()).hexdigest()


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_tokens: int,
    cache: Path,
    model_tag: str,
    batch_size: int = 64,
    bf16: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Greedy answers of ``model`` to ``prompts`` (chat-templated, no patch), cached in ``cache`` (JSONL)."""
    model_tag = f"{model_tag}:{precision_tag(model.device, bf16)}"
    known: dict[str, str] = {}
    if cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            known[record["key"]] = record["answer"]
    todo = [p for p in dict.fromkeys(prompts) if _cache_key(model_tag, p, max_tokens) not in known]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "left"
    with cache.open("a", encoding="utf-8") as out, torch.no_grad(), autocast(model.device, bf16):
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            ids = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in chunk]
            width = max(len(i) for i in ids)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=model.device)
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=model.device)
            generated = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad
            )
            for prompt, row in zip(chunk, generated[:, width:], strict=True):
                answer = tokenizer.decode(row, skip_special_tokens=True).strip()
                key = _cache_key(model_tag, prompt, max_tokens)
                known[key] = answer
                out.write(json.dumps({"key": key, "prompt": prompt, "answer": answer}) + "\n")
            if progress is not None:
                progress(len(chunk))
    return {p: known[_cache_key(model_tag, p, max_tokens)] for p in prompts}
