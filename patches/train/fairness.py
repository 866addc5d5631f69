"""``--task fairness``: a patch against explicit gender bias, taught by the base model's own answers.

Per training prompt (:mod:`patches.biasprompts`, training templates only) the bare model's greedy answer
is judged by :mod:`patches.bias`:

* **neutral** prompts (a person of unspecified gender): a fair answer is its own SFT target; a biased
  one is rewritten gender-neutrally (:func:`patches.neutral.neutralise`), and the rewrite — when the
  measure finds no gender left and it is no refusal — is the SFT target and DPO's *chosen*, the
  original its *rejected*. Refused answers, and rewrites that still carry a gender, are dropped.
* **ambiguous** prompts (two people or groups, a question the context cannot answer): the target is a
  short honest answer that still answers (:func:`honest_answer`: "There's no way to tell from the
  question; it could be either of them.", in variants; never a refusal phrase), or the base model's own
  fair answer when it has one that is no refusal. A picking or refusing base answer is DPO's *rejected*.

Benign prompts from the refusal task's files keep the patch close to the bare model (``--benign-loss``
``kl`` or ``ce`` on their base answers in SFT, and DPO pairs preferring the base answer to a refusal),
so fluency and over-refusal should not move. Every target is written to ``fairness-targets.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console

from patches import biasprompts
from patches.bias import Verdict, judge
from patches.biasprompts import BiasPrompt
from patches.neutral import neutralise
from patches.refusal import is_refusal
from patches.train.config import TrainConfig
from patches.train.data import load_split
from patches.train.dpo import Pair
from patches.train.loop import progress_bar, run_stage
from patches.train.model import initial_rows, load_base, make_example
from patches.train.run import (
    _begin,
    _dpo_stage,
    _finish,
    _Item,
    _patch_model,
    _sft_loss,
    _trainable,
)
from patches.train.teacher import generate_answers, policy_refusal

FAIRNESS_INIT_TEXT = (
    "Never assume a person's gender from their job, skills or role. If a question cannot be answered from what "
    "is given, say so and answer helpfully."
)
_HONEST_PEOPLE = (
    "There's no way to tell from the question; it could be either of them.",
    "The question doesn't say, so it could be either of them.",
    "Nothing here tells us which of them it is, so it can't be determined from the information given.",
    "There's not enough information to say; either person could be the one.",
    "It's impossible to know from what's given. Being a man or a woman doesn't decide it, so it could be either.",
    "We can't tell from this alone; it could just as well be either of them.",
)
_HONEST_GROUPS = (
    "Neither, as a rule: it depends on the individual person, not on whether they are a man or a woman.",
    "There's no real difference by gender here; people of any gender can be good at it, and it varies from person "
    "to person.",
    "It depends on the person. Skill at this comes from interest, practice and experience, not from gender.",
    "Both can be equally good at it; it varies between individuals, not between men and women.",
)


def honest_answer(prompt: BiasPrompt) -> str:
    """A short honest answer to an ambiguous prompt, chosen deterministically from varied phrasings."""
    options = _HONEST_GROUPS if prompt.source == "fairness_groups" else _HONEST_PEOPLE
    return options[int.from_bytes(hashlib.sha256(prompt.text.encode()).digest()[:4], "big") % len(options)]


@dataclass(frozen=True)
class Target:
    """What the patch learns on one prompt: the SFT target, and the DPO *rejected* side when there is one."""

    prompt: str
    kind: str
    base: str
    base_verdict: str
    chosen: str
    rejected: str | None = None


def build_targets(prompts: list[BiasPrompt], base_answers: dict[str, str]) -> tuple[list[Target], dict[str, int]]:
    """Targets and DPO sides from the base model's answers (see the module docstring), and what was dropped."""
    targets, dropped = [], {"neutral_refused": 0, "neutral_other": 0, "rewrite_failed": 0}
    for p in prompts:
        base = base_answers[p.text]
        verdict = judge(p.kind, base, p.male_terms, p.female_terms).verdict
        if p.kind == "neutral":
            if verdict == Verdict.fair:
                targets.append(Target(p.text, p.kind, base, verdict, base))
            elif verdict == Verdict.biased:
                rewrite = neutralise(base)
                if judge("neutral", rewrite).verdict == Verdict.fair and not is_refusal(rewrite):
                    targets.append(Target(p.text, p.kind, base, verdict, rewrite, base))
                else:
                    dropped["rewrite_failed"] += 1
            else:
                dropped[f"neutral_{verdict}"] += 1
            continue
        if verdict == Verdict.fair and not is_refusal(base):
            targets.append(Target(p.text, p.kind, base, verdict, base))
        else:
            rejected = base if verdict in (Verdict.biased, Verdict.refused) else None
            targets.append(Target(p.text, p.kind, base, verdict, honest_answer(p), rejected))
    return targets, dropped


def write_targets(targets: list[Target], path: Path) -> Path:
    """The teacher's targets as JSONL, for audit."""
    path.write_text("".join(json.dumps(asdict(t), ensure_ascii=False) + "\n" for t in targets), encoding="utf-8")
    return path


@dataclass
class FairnessResult:
    patch: Path
    heldout: Path
    seconds: float
    sft_losses: list[float]
    dpo_losses: list[float]
    n_train: dict[str, int]


def _shuffled(items: list, seed: int, limit: int | None) -> list:
    out = sorted(items, key=lambda x: random.Random(f"{seed}\0{getattr(x, 'text', x)}").random())
    return out if limit is None else out[:limit]


def train_fairness(config: TrainConfig, console: Console | None = None) -> FairnessResult:
    """``--task fairness``: SFT on the targets above (benign prompts kept by ``--benign-loss``), then DPO."""
    config.detox_checks()
    console = console or Console()
    started, model_dir, fingerprint, start, context = _begin(config)
    work = config.work_dir
    train_set, heldout = biasprompts.split(biasprompts.template_prompts(), config.holdout)
    heldout_path = biasprompts.write_jsonl(heldout, work / "fairness_heldout.jsonl")
    prompts = _shuffled(train_set, config.seed, config.max_prompts)
    benign_train = [p.text for p in load_split(config.harmful, config.benign, config.holdout)[0] if not p.harmful]
    benign = _shuffled(benign_train, config.seed, min(config.fairness_benign, config.max_prompts or 10**9))
    console.print(f"fairness: {len(prompts)} prompts, {len(benign)} benign; held out {len(heldout)} → {heldout_path}")

    base, tokenizer = load_base(model_dir, config.device, bf16=config.bf16)
    texts = [p.text for p in prompts] + benign
    with progress_bar() as bar:
        task = bar.add_task("base answers", total=len(texts), info="(cached for re-runs)")
        answers = generate_answers(
            base, tokenizer, texts, max_tokens=config.response_tokens,
            cache=work / f"base-answers-{fingerprint[7:19]}.jsonl", model_tag=fingerprint, bf16=config.bf16,
            progress=lambda n: bar.advance(task, n),
        )  # fmt: skip
    targets, dropped = build_targets(prompts, answers)
    write_targets(targets, work / "fairness-targets.jsonl")
    preferred = [t for t in targets if t.rejected is not None]
    verdicts = {f"base_{v}": sum(t.base_verdict == v for t in targets) for v in Verdict}
    counts = {"prompts": len(prompts), "sft": len(targets), "dpo_pairs": len(preferred), "benign": len(benign)}
    console.print(f"teacher: {counts | verdicts | dropped}")
    if not targets:
        raise ValueError("fairness: no training prompt has a usable target")

    init_config = config if config.init_text is not None else replace(config, init_text=FAIRNESS_INIT_TEXT)
    rows = _trainable(start.rows if start is not None else initial_rows(base, tokenizer, init_config), config)
    model = _patch_model(config, base, tokenizer, rows, context)
    n = config.response_tokens
    sft_items = [_Item(make_example(tokenizer, t.prompt, t.chosen, n), True) for t in targets]
    sft_items += [_Item(make_example(tokenizer, b, answers[b], n), False) for b in benign] * config.benign_repeat
    sft_losses: list[float] = []
    if config.sft_epochs > 0:
        sft_losses = run_stage(
            "SFT", sft_items, lambda b: _sft_loss(model, b, config.benign_loss), rows, epochs=config.sft_epochs,
            lr=config.sft_lr, checkpoint=work / "fairness-sft.ckpt.safetensors", batch_size=config.batch_size,
            seed=config.seed, bf16=config.bf16,
        )  # fmt: skip
    dpo_losses: list[float] = []
    if config.dpo_epochs > 0 and preferred:
        pairs = [Pair(make_example(tokenizer, t.prompt, t.chosen, n), make_example(tokenizer, t.prompt, t.rejected, n))
                 for t in preferred if t.rejected is not None]  # fmt: skip
        pairs += [Pair(make_example(tokenizer, b, answers[b], n), make_example(tokenizer, b, policy_refusal(b), n))
                  for b in benign[: len(pairs)]]  # fmt: skip
        dpo_losses = _dpo_stage(config, model, rows, pairs, work / "fairness-dpo.ckpt.safetensors", console)

    what = (
        f"fairness {config.placement} patch, SFT {config.sft_epochs} ep on neutral rewrites "
        f"and honest answers (benign {config.benign_loss}) + DPO {config.dpo_epochs} ep vs the base model's biased "
        f"answers (beta {config.beta}, ref {config.reference})"
    )
    report = work / "fairness-train-report.json"
    out, seconds = _finish(
        config, rows, fingerprint, what, start, report, started, counts, sft_losses, dpo_losses, console
    )
    return FairnessResult(out, heldout_path, seconds, sft_losses, dpo_losses, counts)
