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
* **Clean by construction** (``--ban-words N``): the chosen side is drawn from a second sample set in which
  the scorer's N most offensive words (:func:`patches.toxicity.offensive_words`) can never be completed.

:func:`train_detox` runs the recipe (``patchserve train --task detox``).

Samples are cached per model, k, length, temperature and seed in a JSONL file in the work directory
(token ids included, so examples are built from exactly the tokens the model produced).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from patches import continuations
from patches.device import autocast, precision_tag
from patches.refusal import is_refusal
from patches.toxicity import TOXIC, Scorer, default_scorer, offensive_words
from patches.train.config import TrainConfig
from patches.train.dpo import Pair
from patches.train.loop import progress_bar, run_stage
from patches.train.model import Example, initial_rows, load_base, nll
from patches.train.run import _begin, _dpo_stage, _finish, _patch_model, _trainable


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
    banned: list[list[int]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[Sample]]:
    """``k`` sampled continuations of each prompt (raw text, no patch), cached in ``cache`` (JSONL).

    Prompts are generated ``batch_prompts`` at a time (left-padded), each chunk from its own seed (a hash
    of ``seed`` and the chunk's prompts) without touching the global RNG state. ``banned`` token sequences
    (:func:`banned_sequences`) are never completed (transformers' ``bad_words_ids``).
    """
    tag = f"{model_tag}:{precision_tag(model.device, bf16)}:k{k}:t{max_tokens}:T{temperature}:s{seed}"
    if banned:
        tag += ":ban" + hashlib.sha256(json.dumps(banned).encode()).hexdigest()[:12]
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
                    bad_words_ids=banned or None,
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


def banned_sequences(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """Token ids of each word as it can appear in running text: after a space or not, lower case, capitalised
    and upper case. Sampling with these as ``bad_words_ids`` never completes one: a one-token form is never
    drawn, a longer one's last token is held back once the rest is there (so a word split otherwise may pass)."""
    seen: dict[tuple[int, ...], None] = {}
    for word in words:
        for form in dict.fromkeys((word, word.capitalize(), word.upper())):
            for text in (f" {form}", form):
                ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    seen.setdefault(ids, None)
    return [list(ids) for ids in seen]


def choose(
    samples: dict[str, list[Sample]],
    scorer: Scorer,
    *,
    min_tokens: int = 4,
    max_chosen: float = TOXIC,
    clean: dict[str, list[Sample]] | None = None,
) -> list[Choice]:
    """Per opening: the least toxic eligible continuation (not a refusal, ≥ ``min_tokens`` tokens; ties go
    to the longer) and the most toxic continuation. Openings whose best is still ≥ ``max_chosen`` are left out.
    With ``clean`` (samples drawn with offensive words banned) the chosen side comes from those instead."""
    prompts = list(samples)
    pools = [samples, clean] if clean else [samples]
    scores = iter(scorer.score([s.text for pool in pools for p in prompts for s in pool[p]]))
    scored_pools = [{p: [(next(scores), s) for s in pool[p]] for p in prompts} for pool in pools]
    choices = []
    for prompt in prompts:
        scored = scored_pools[0][prompt]
        candidates = scored_pools[-1][prompt]
        eligible = [(v, s) for v, s in candidates if len(s.ids) >= min_tokens and not is_refusal(s.text)]
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


@dataclass
class DetoxResult:
    patch: Path
    heldout: Path
    seconds: float
    sft_losses: list[float]
    dpo_losses: list[float]
    n_train: dict[str, int]


def train_detox(config: TrainConfig, console: Console | None = None, scorer: Scorer | None = None) -> DetoxResult:
    """``--task detox``: SFT on the base model's least toxic continuation of each opening, then DPO with
    least toxic as chosen and most toxic as rejected (:mod:`patches.train.detox`)."""
    config.detox_checks()
    console = console or Console()
    scorer = scorer or default_scorer()
    started, model_dir, fingerprint, start, context = _begin(config)
    work = config.work_dir
    files = config.continuations or continuations.default_files()
    if not files:
        raise ValueError("invalid training config: continuations=[] (no files given, none in ../shared/data)")
    train_set, heldout = continuations.split(continuations.read_continuations(files), config.holdout)
    heldout_path = continuations.write_jsonl(heldout, work / "heldout_continuations.jsonl")
    if config.max_prompts is not None:
        train_set = sorted(train_set, key=lambda p: random.Random(f"{config.seed}\0{p.text}").random())
        train_set = train_set[: config.max_prompts]
    prompts = [p.text for p in train_set]
    console.print(f"detox: {len(prompts)} training openings; held out {len(heldout)} → {heldout_path}")

    base, tokenizer = load_base(model_dir, config.device, bf16=config.bf16)
    samples = _samples(config, base, tokenizer, prompts, work / f"detox-samples-{fingerprint[7:19]}.jsonl", fingerprint)
    clean = _clean_samples(config, base, tokenizer, prompts, scorer, work, fingerprint) if config.ban_words else None
    choices = choose(samples, scorer, min_tokens=config.min_tokens, clean=clean)
    write_choices(choices, work / "detox-choices.jsonl", config.detox_margin)
    preferred = [c for c in choices if c.is_preference(config.detox_margin)]
    counts = {"openings": len(prompts), "sft": len(choices), "dpo_pairs": len(preferred)}
    console.print(f"teacher ({getattr(scorer, 'name', type(scorer).__name__)}): {counts}")
    if not choices:
        raise ValueError("detox: no opening has a clean continuation to learn from")

    init_config = config if config.init_text is not None else replace(config, init_text=continuations.DETOX_INIT_TEXT)
    rows = _trainable(start.rows if start is not None else initial_rows(base, tokenizer, init_config), config)
    model = _patch_model(config, base, tokenizer, rows, context)
    common = {"batch_size": config.batch_size, "seed": config.seed, "bf16": config.bf16}
    n = config.continuation_tokens
    sft_items = [continuation_example(tokenizer, c.prompt, c.chosen, n) for c in choices]
    sft_losses: list[float] = []
    if config.sft_epochs > 0:
        sft_losses = run_stage(
            "SFT",
            sft_items,
            lambda b: nll(model.response_logits(b, model.rows)),
            rows,
            epochs=config.sft_epochs,
            lr=config.sft_lr,
            checkpoint=work / "detox-sft.ckpt.safetensors",
            **common,
        )
    dpo_losses: list[float] = []
    if config.dpo_epochs > 0 and preferred:
        pairs = [
            Pair(
                continuation_example(tokenizer, c.prompt, c.chosen, n),
                continuation_example(tokenizer, c.prompt, c.rejected, n),
            )
            for c in preferred
        ]
        dpo_losses = _dpo_stage(config, model, rows, pairs, work / "detox-dpo.ckpt.safetensors", console)

    teacher = f" sampled without the scorer's {config.ban_words} most offensive words" if config.ban_words else ""
    what = (
        f"detox {config.placement} patch, SFT {config.sft_epochs} ep on the least toxic of "
        f"{config.samples} base-model continuations{teacher} + DPO {config.dpo_epochs} ep vs the most toxic (beta "
        f"{config.beta}, ref {config.reference}), scorer {getattr(scorer, 'name', type(scorer).__name__)}"
    )
    report = work / "detox-train-report.json"
    out, seconds = _finish(
        config, rows, fingerprint, what, start, report, started, counts, sft_losses, dpo_losses, console
    )
    return DetoxResult(out, heldout_path, seconds, sft_losses, dpo_losses, counts)


def _clean_samples(
    config: TrainConfig, base: Any, tokenizer: Any, prompts: list[str], scorer: Scorer, work: Path, fingerprint: str
) -> dict[str, list[Sample]]:
    """``--ban-words N``: the teacher's own continuations sampled again with the scorer's N most offensive
    words banned at every step, so the chosen side is clean by construction and otherwise the model's own."""
    words = offensive_words(scorer, config.ban_words)
    cache = work / f"detox-clean-samples-{fingerprint[7:19]}.jsonl"
    banned = banned_sequences(tokenizer, words)
    return _samples(config, base, tokenizer, prompts, cache, fingerprint, banned=banned, label=f"({len(words)} banned)")


def _samples(
    config: TrainConfig,
    base: Any,
    tokenizer: Any,
    prompts: list[str],
    cache: Path,
    fingerprint: str,
    *,
    banned: list[list[int]] | None = None,
    label: str = "(cached for re-runs)",
) -> dict[str, list[Sample]]:
    """The configured sampling of every opening (:func:`sample_continuations`) with a progress bar."""
    with progress_bar() as bar:
        what = f"{config.samples} {'clean ' if banned else ''}samples each"
        task = bar.add_task(what, total=len(prompts), info=label)
        return sample_continuations(
            base,
            tokenizer,
            prompts,
            k=config.samples,
            max_tokens=config.continuation_tokens,
            cache=cache,
            model_tag=fingerprint,
            temperature=config.sample_temperature,
            seed=config.seed,
            bf16=config.bf16,
            banned=banned,
            progress=lambda n: bar.advance(task, n),
        )
