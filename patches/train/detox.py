"""The ``detox`` teacher: the base model's own continuations, sampled, scored and ranked by toxicity.

No detoxified reference model ships offline, so the teacher is selection: for every training opening the
bare base model samples ``k`` continuations as raw text — the opening tokenised as plain text with no
chat template and no special tokens, exactly as the server's ``/v1/completions`` encodes a prompt —
at temperature 1 with no top-p/top-k cut (the server's defaults), and :mod:`patches.toxicity` scores
each continuation alone (as RealToxicityPrompts scores generations, not prompt + generation).

* **SFT target** = the least toxic continuation that is not a refusal (:func:`patches.refusal.is_refusal`)
  and has at least ``min_tokens`` tokens, so the patch learns to *continue cleanly*, not to decline or to
  stop; an opening whose least toxic such continuation still scores ≥ 0.5 teaches nothing clean and is
  dropped.
* **DPO pair** = (that continuation, the most toxic one) when their scores differ by ≥ ``margin``.

Samples are cached per model, k, length, temperature and seed in a JSONL file in the work directory
(token ids included, so examples are built from exactly the tokens the model produced).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patches.device import autocast, precision_tag
from patches.refusal import is_refusal
from patches.toxicity import TOXIC, Scorer
from patches.train.model import Example


@dataclass(frozen=True)
class Sample:
    """One sampled continuation: its text, its token ids, and whether the model ended it (end-of-sequence)."""

    text: str
    ids: tuple[int, ...]
    ended: bool


@dataclass(frozen=True)
class Choice:
    """An opening's least toxic eligible continuation and its most toxic one, with their scores."""

    prompt: str
    chosen: Sample
    chosen_score: float
    rejected: Sample
    rejected_score: float

    def is_preference(self, margin: float) -> bool:
        return self.rejected is not self.chosen and self.rejected_score - self.chosen_score >= margin


def encode_raw(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a completion prompt as the server encodes it: plain text, no added special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _key(tag: str, prompt: str) -> str:
    return hashlib.sha256(f"{tag}\0{prompt}".encode()).hexdigest()


def _seed(seed: int, prompts: list[str]) -> int:
    digest = hashlib.sha256("\0".join([str(seed), *prompts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def _split(row: list[int], eos: int | None) -> tuple[list[int], bool]:
    """A generated row cut at its first end-of-sequence (after which generate only pads), and whether it had one."""
    if eos is not None and eos in row:
        return row[: row.index(eos)], True
    return row, False


def sample_continuations(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    k: int,
    max_tokens: int,
    cache: Path,
    model_tag: str,
    temperature: float = 1.0,
    seed: int = 0,
    batch_prompts: int = 4,
    bf16: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[Sample]]:
    """``k`` sampled continuations of each prompt (raw text, no patch), cached in ``cache`` (JSONL).

    Prompts are generated ``batch_prompts`` at a time (left-padded), each chunk from its own seed (a hash
    of ``seed`` and the chunk's prompts) without touching the global RNG state.
    """
    tag = f"{model_tag}:{precision_tag(model.device, bf16)}:k{k}:t{max_tokens}:T{temperature}:s{seed}"
    known: dict[str, list[Sample]] = {}
    if cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            known[record["key"]] = [Sample(s["text"], tuple(s["ids"]), s["ended"]) for s in record["samples"]]
    todo = [p for p in dict.fromkeys(prompts) if _key(tag, p) not in known]
    cache.parent.mkdir(parents=True, exist_ok=True)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    with cache.open("a", encoding="utf-8") as out, torch.no_grad(), autocast(model.device, bf16):
        for start in range(0, len(todo), batch_prompts):
            chunk = todo[start : start + batch_prompts]
            ids = [encode_raw(tokenizer, p) for p in chunk]
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=model.device)
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=model.device)
            with torch.random.fork_rng():
                torch.manual_seed(_seed(seed, chunk))
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_tokens,
                    do_sample=True,
                    temperature=temperature,
                    top_p=1.0,
                    top_k=0,
                    num_return_sequences=k,
                    pad_token_id=pad,
                )
            rows = generated[:, width:].tolist()
            for n, prompt in enumerate(chunk):
                samples = []
                for row in rows[n * k : (n + 1) * k]:
                    kept, ended = _split(row, eos)
                    samples.append(Sample(tokenizer.decode(kept, skip_special_tokens=True), tuple(kept), ended))
                key = _key(tag, prompt)
                known[key] = samples
                rows_out = [{"text": s.text, "ids": list(s.ids), "ended": s.ended} for s in samples]
                record = {"key": key, "prompt": prompt, "samples": rows_out}
                out.write(json.dumps(record) + "\n")
            out.flush()
            if progress is not None:
                progress(len(chunk))
    return {p: known[_key(tag, p)] for p in prompts}


def choose(
    samples: dict[str, list[Sample]], scorer: Scorer, *, min_tokens: int = 4, max_chosen: float = TOXIC
) -> list[Choice]:
    """Per opening: the least toxic eligible continuation (not a refusal, ≥ ``min_tokens`` tokens; ties go
    to the longer) and the most toxic continuation. Openings whose best is still ≥ ``max_chosen`` are left out."""
    prompts = list(samples)
    flat = [s for p in prompts for s in samples[p]]
    scores = iter(scorer.score([s.text for s in flat]))
    choices = []
    for prompt in prompts:
        scored = [(next(scores), s) for s in samples[prompt]]
        eligible = [(v, s) for v, s in scored if len(s.ids) >= min_tokens and not is_refusal(s.text)]
        if not eligible:
            continue
        best_score, best = min(eligible, key=lambda vs: (vs[0], -len(vs[1].ids)))
        if best_score >= max_chosen:
            continue
        worst_score, worst = max(scored, key=lambda vs: vs[0])
        choices.append(Choice(prompt, best, best_score, worst, worst_score))
    return choices


def continuation_example(tokenizer: Any, prompt: str, sample: Sample, max_tokens: int) -> Example:
    """The raw-text prompt and a continuation's own tokens, with the end of sequence when the model ended it
    within ``max_tokens`` (a cut continuation gets none, so the patch never learns to stop early)."""
    response = list(sample.ids)[:max_tokens]
    if sample.ended and len(response) < max_tokens and tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    if not response:
        raise ValueError(f"empty continuation for {prompt[:40]!r}")
    return Example(encode_raw(tokenizer, prompt), response)


def write_choices(choices: list[Choice], path: Path, margin: float) -> Path:
    """The teacher's picks as JSONL, for audit: opening, chosen and rejected text with their scores."""
    lines = (
        json.dumps(
            {
                "prompt": c.prompt,
                "chosen": c.chosen.text,
                "chosen_score": round(c.chosen_score, 4),
                "rejected": c.rejected.text,
                "rejected_score": round(c.rejected_score, 4),
                "pair": c.is_preference(margin),
            }
        )
        for c in choices
    )
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path
