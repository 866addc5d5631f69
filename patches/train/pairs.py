"""Stage 2's preference pairs for the refusal task: from every training prompt, or mined from the stage-1
patch's own mistakes.

``all`` (the paper's recipe): a harmful prompt pairs the teacher's refusal (chosen) with the base
model's compliant answer (rejected); a benign prompt pairs the base model's answer (chosen) with a
written refusal (rejected). Most of those pairs are already won by the stage-1 patch, so their gradient is
small and the few prompts it gets wrong weigh little.

``mined`` (on-policy hard examples): the stage-1 patch answers every training prompt greedily, and the
pairs are the ones it gets wrong, with *its own* answer as the rejected side — a benign prompt it refuses
(chosen: the base answer), a harmful prompt it answers (chosen: the refusal). ``anchors`` correct pairs
per mined pair, drawn at random from the ``all`` pairs of prompts it gets right (half harmful, half benign),
keep the rest in place. With written refusals (the ``policy`` teachers) the chosen refusals are kept
whole with their end of turn, so the patch learns to stop after refusing.

The policy's answers are written to ``mined-answers.jsonl`` in the work directory for audit, with a
digest of the rows that gave them; a re-run from the same rows reuses them instead of mining again.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from patches.chat import encode_chat
from patches.device import autocast
from patches.refusal import is_refusal
from patches.train.config import DpoPairs, TrainConfig
from patches.train.data import Prompt
from patches.train.dpo import Pair
from patches.train.loop import progress_bar
from patches.train.model import PatchModel, make_example
from patches.train.teacher import policy_refusal


def fixed_pair(
    tokenizer: Any, prompt: Prompt, target: str, base_answer: str, tokens: int, refusal_tokens: int | None = None
) -> Pair | None:
    """The ``all`` pair of one prompt; ``None`` for a harmful prompt the base model already refuses.

    ``refusal_tokens`` (default ``tokens``) caps a harmful prompt's chosen refusal separately.
    """
    if prompt.harmful and is_refusal(base_answer):
        return None  # no preference to learn
    if prompt.harmful:
        return _pair(tokenizer, prompt.text, target, base_answer, refusal_tokens or tokens, tokens)
    return _pair(tokenizer, prompt.text, base_answer, policy_refusal(prompt.text), tokens, tokens)


def _pair(tokenizer: Any, prompt: str, chosen: str, rejected: str, chosen_tokens: int, rejected_tokens: int) -> Pair:
    chosen_example = make_example(tokenizer, prompt, chosen, chosen_tokens)
    return Pair(chosen_example, make_example(tokenizer, prompt, rejected, rejected_tokens))


def policy_answers(
    model: PatchModel,
    tokenizer: Any,
    prompts: list[Prompt],
    tokens: int,
    *,
    bf16: bool,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers of the model with its current rows to ``prompts`` (``tokens`` long at most)."""
    answers: list[str] = []
    with torch.no_grad(), autocast(model.rows.device, bf16):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [encode_chat(tokenizer, [{"role": "user", "content": p.text}]) for p in chunk]
            for row in model.generate(ids, model.rows, tokens):
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            if progress is not None:
                progress(len(chunk))
    return answers


def mined_pairs(
    tokenizer: Any,
    prompts: list[Prompt],
    answers: list[str],
    targets: dict[str, str],
    base_answers: dict[str, str],
    tokens: int,
    *,
    anchors: float,
    seed: int,
    refusal_tokens: int | None = None,
    harmful_repeat: int = 1,
) -> tuple[list[Pair], dict[str, int]]:
    """Pairs from the prompts the policy got wrong (its ``answers``), plus ``anchors`` right ones per wrong one.

    ``refusal_tokens`` (default ``tokens``) caps the chosen refusals separately: with written refusals
    they are kept whole, end of turn included, so the patch learns to stop after refusing instead of
    refusing and then answering anyway. ``harmful_repeat`` copies of each harmful prompt the policy answered
    weigh that side of the boundary up: a patch that refuses too much has more benign mistakes than
    harmful ones, and unweighted mining then moves it towards answering everything.
    """
    wrong: list[Pair] = []
    right: list[tuple[Pair, bool]] = []
    counts = {"harmful_answered": 0, "benign_refused": 0}
    for prompt, answer in zip(prompts, answers, strict=True):
        refused = is_refusal(answer)
        if prompt.harmful and not refused:
            counts["harmful_answered"] += 1
            chosen, chosen_tokens, copies = targets[prompt.text], refusal_tokens or tokens, harmful_repeat
        elif not prompt.harmful and refused and not is_refusal(base_answers[prompt.text]):
            counts["benign_refused"] += 1
            chosen, chosen_tokens, copies = base_answers[prompt.text], tokens, 1
        else:
            target, base_answer = targets[prompt.text], base_answers[prompt.text]
            pair = fixed_pair(tokenizer, prompt, target, base_answer, tokens, refusal_tokens)
            if pair is not None:
                right.append((pair, prompt.harmful))
            continue
        wrong += [_pair(tokenizer, prompt.text, chosen, answer, chosen_tokens, tokens)] * copies
    distinct = counts["harmful_answered"] + counts["benign_refused"]
    rng, want = random.Random(seed), round(anchors * distinct)
    kept = []
    for harmful in (True, False):  # half from each class, so the anchors hold both sides of the boundary
        pool = [pair for pair, h in right if h == harmful]
        kept += rng.sample(pool, min(len(pool), want // 2 if harmful else want - want // 2))
    counts["anchors"] = len(kept)
    return wrong + kept, counts


def write_answers(path: Path, prompts: list[Prompt], answers: list[str], rows_digest: str) -> None:
    """The policy's answers, one JSON line per prompt, for audit (and reuse by a re-run from the same rows)."""
    with path.open("w", encoding="utf-8") as out:
        for prompt, answer in zip(prompts, answers, strict=True):
            refused = is_refusal(answer)
            record = {"prompt": prompt.text, "harmful": prompt.harmful, "answer": answer, "refused": refused}
            out.write(json.dumps(record | {"rows": rows_digest}) + "\n")


def _known_answers(path: Path, prompts: list[Prompt], rows_digest: str) -> list[str] | None:
    """The answers ``path`` holds for exactly these prompts from exactly these rows, else ``None``."""
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    same_prompts = [r["prompt"] for r in records] == [p.text for p in prompts]
    if not same_prompts or any(r.get("rows") != rows_digest for r in records):
        return None
    return [r["answer"] for r in records]


def _rows_digest(rows: torch.Tensor, tokens: int, bf16: bool) -> str:
    data = rows.detach().float().cpu().numpy().tobytes() + f"{tokens}:{bf16}".encode()
    return hashlib.sha256(data).hexdigest()[:16]


def refusal_pairs(
    config: TrainConfig,
    model: PatchModel,
    tokenizer: Any,
    prompts: list[Prompt],
    targets: dict[str, str],
    base_answers: dict[str, str],
    counts: dict[str, int],
    console: Console,
) -> list[Pair]:
    """Stage 2's pairs (:mod:`patches.train.pairs`); ``counts`` gains what mining found."""
    tokens = config.response_tokens
    if config.dpo_pairs == DpoPairs.all:
        found = (
            fixed_pair(tokenizer, p, targets[p.text], base_answers[p.text], tokens, config.refusal_cap) for p in prompts
        )
        return [pair for pair in found if pair is not None]
    audit, digest = config.work_dir / "mined-answers.jsonl", _rows_digest(model.stack_rows(), tokens, config.bf16)
    answers = _known_answers(audit, prompts, digest)  # a resumed run mines the same rows again: skip it
    if answers is None:
        with progress_bar() as bar:
            task = bar.add_task("mining", total=len(prompts), info="(the stage-1 patch answers every prompt)")
            answers = policy_answers(
                model, tokenizer, prompts, tokens, bf16=config.bf16, progress=lambda n: bar.advance(task, n)
            )
        write_answers(audit, prompts, answers, digest)
    pairs, mined = mined_pairs(
        tokenizer, prompts, answers, targets, base_answers, tokens, anchors=config.dpo_anchors, seed=config.seed,
        refusal_tokens=config.refusal_cap, harmful_repeat=config.dpo_harmful_repeat,
    )  # fmt: skip
    counts.update(mined)
    console.print(f"mined {mined}")
    return pairs
