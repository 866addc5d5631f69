"""``patchserve train``: data → teacher → SFT → DPO → a format-v1 patch file (signed when given a key)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console

from patches.basemodel import prepare_default_model
from patches.fingerprint import fingerprint_model, model_spec
from patches.format import Patch, PatchMetadata, dump_patch, load_patch, write_atomic
from patches.signing import load_private_key, sign_patch
from patches.stack import SEPARATOR
from patches.train.config import BenignLoss, Reference, TrainConfig
from patches.train.data import Prompt, load_split, write_heldout
from patches.train.dpo import Pair, dpo_loss, with_reference
from patches.train.loop import progress_bar, run_stage
from patches.train.model import (
    Example,
    PatchModel,
    PlacedRows,
    initial_rows,
    kl_to_reference,
    load_base,
    make_example,
    nll,
)
from patches.train.pairs import refusal_pairs
from patches.train.teacher import POLICY_TEACHERS, generate_answers, policy_refusal


@dataclass
class TrainResult:
    patch: Path
    heldout: tuple[Path, Path]
    seconds: float
    sft_losses: list[float]
    dpo_losses: list[float]
    n_train: dict[str, int]


def _cap(prompts: list[Prompt], limit: int | None, seed: int) -> list[Prompt]:
    if limit is None:
        return prompts
    out = []
    for harmful in (True, False):
        group = [p for p in prompts if p.harmful == harmful]
        random.Random(seed).shuffle(group)
        out += group[:limit]
    return out


def _teacher_targets(
    config: TrainConfig, prompts: list[Prompt], base_answers: dict[str, str], work: Path
) -> dict[str, str]:
    if config.teacher in POLICY_TEACHERS:
        offer = POLICY_TEACHERS[config.teacher]
        return {p.text: policy_refusal(p.text, offer=offer) if p.harmful else base_answers[p.text] for p in prompts}
    teacher_dir = Path(config.teacher)
    teacher, tokenizer = load_base(teacher_dir, config.device, bf16=config.bf16)
    return generate_answers(
        teacher,
        tokenizer,
        [p.text for p in prompts],
        max_tokens=config.response_tokens,
        cache=work / "teacher-answers.jsonl",
        model_tag=fingerprint_model(teacher_dir),
        bf16=config.bf16,
    )


def _starting_patch(path: Path, model_dir: Path, config: TrainConfig) -> Patch:
    """The patch ``--init-from`` names, checked for this model, row count and placement before any work."""
    start = load_patch(path, expect=model_spec(model_dir))
    if start.n_tokens != config.n_tokens:
        raise ValueError(f"--init-from {start.ref} has {start.n_tokens} rows; --n-tokens is {config.n_tokens}")
    if start.placement != config.placement:
        raise ValueError(f"--init-from {start.ref} is a {start.placement} patch; --placement is {config.placement}")
    return start


def _stack_context(config: TrainConfig, model_dir: Path) -> tuple[PlacedRows, ...]:
    """The ``--stack-with`` patches, checked for this model before any work, on the config's device."""
    patches = [load_patch(path, expect=model_spec(model_dir)) for path in config.stack_with]
    return tuple(PlacedRows(p.rows.to(config.device), p.placement) for p in patches)


class _Begun(NamedTuple):
    """What every task has before its data: the start time, the base model and its fingerprint, the
    ``--init-from`` patch and the ``--stack-with`` context, each checked for this model."""

    started: float
    model_dir: Path
    fingerprint: str
    start: Patch | None
    context: tuple[PlacedRows, ...]


def _begin(config: TrainConfig) -> _Begun:
    """Every task's first step: seed, threads, the work directory, then the model and the patches it names."""
    started = time.monotonic()
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = config.model or prepare_default_model()
    start = _starting_patch(config.init_from, model_dir, config) if config.init_from else None
    return _Begun(started, model_dir, fingerprint_model(model_dir), start, _stack_context(config, model_dir))


def _patch_model(
    config: TrainConfig, base: Any, tokenizer: Any, rows: torch.nn.Parameter, context: tuple[PlacedRows, ...]
) -> PatchModel:
    """The trained rows in their placement, after the frozen ``--stack-with`` patches (the served separator)."""
    (separator,) = tokenizer.encode(SEPARATOR, add_special_tokens=False)
    return PatchModel(base, rows, config.placement, context=context, separator_id=separator)


def _trainable(start: torch.Tensor, config: TrainConfig) -> torch.nn.Parameter:
    """The patch rows as the trained parameter: float32 (also over bf16 weights), on the config's device."""
    return torch.nn.Parameter(start.detach().to(config.device, torch.float32).clone())


def _target_cap(config: TrainConfig, harmful: bool) -> int:
    return config.refusal_cap if harmful else config.response_tokens


@dataclass(frozen=True)
class _Item:
    """One stage-1 example: harmful ones are fitted by cross-entropy, benign ones by ``benign_loss``."""

    example: Example
    harmful: bool


def _sft_loss(model: PatchModel, batch: list[_Item], benign_loss: BenignLoss) -> torch.Tensor:
    """Token-weighted mix: cross-entropy on every CE item, KL to the bare model on benign items in KL mode.
    One patched forward pass serves both; the bare model runs only on the KL items."""
    kl = [k for k, i in enumerate(batch) if not i.harmful and benign_loss == BenignLoss.kl]
    ce = [k for k in range(len(batch)) if k not in kl]
    patched = model.response_logits([i.example for i in batch], model.rows)
    parts, weights = [], []
    if ce:
        parts.append(nll(patched.select(ce)))
        weights.append(sum(len(batch[k].example.response_ids) for k in ce))
    if kl:
        with torch.no_grad():
            bare = model.response_logits([batch[k].example for k in kl], None)
        parts.append(kl_to_reference(patched.select(kl), bare))
        weights.append(sum(len(batch[k].example.response_ids) for k in kl))
    return sum(p * w for p, w in zip(parts, weights, strict=True)) / sum(weights)


def _dpo_stage(
    config: TrainConfig,
    model: PatchModel,
    rows: torch.nn.Parameter,
    pairs: list[Pair],
    checkpoint: Path,
    console: Console,
) -> list[float]:
    """Stage 2 for either task: reference log-probs (the SFT rows or the bare model), then DPO + NLL."""
    if not pairs:  # e.g. mined pairs of a patch that gets every training prompt right
        console.print("no DPO pairs: stage 2 skipped")
        return []
    reference = rows.detach().clone() if config.reference == Reference.sft else None
    console.print(f"DPO on {len(pairs)} pairs; reference log-probs ({config.reference})…")
    pairs = with_reference(pairs, model, reference, bf16=config.bf16)
    return run_stage(
        "DPO",
        pairs,
        lambda b: dpo_loss(model, b, beta=config.beta, nll_weight=config.nll_weight),
        rows,
        epochs=config.dpo_epochs,
        lr=config.dpo_lr,
        checkpoint=checkpoint,
        batch_size=config.batch_size,
        seed=config.seed,
        bf16=config.bf16,
    )


def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Train a patch as configured; see :class:`TrainConfig`."""
    console = console or Console()
    started, model_dir, fingerprint, start, context = _begin(config)
    work = config.work_dir
    train_prompts, heldout = load_split(config.harmful, config.benign, config.holdout)
    heldout_paths = write_heldout(heldout, work)
    prompts = _cap(train_prompts, config.max_prompts, config.seed)
    counts = {"harmful": sum(p.harmful for p in prompts), "benign": sum(not p.harmful for p in prompts)}
    console.print(f"training on {counts}; held out {len(heldout)} prompts → {heldout_paths[0].parent}")

    base, tokenizer = load_base(model_dir, config.device, bf16=config.bf16)
    console.print(f"device {config.device}, {'bf16' if config.bf16 else 'fp32'}")
    with progress_bar() as bar:
        task = bar.add_task("base answers", total=len(prompts), info="(cached for re-runs)")
        base_answers = generate_answers(
            base,
            tokenizer,
            [p.text for p in prompts],
            max_tokens=config.response_tokens,
            cache=work / f"base-answers-{fingerprint[7:19]}.jsonl",
            model_tag=fingerprint,
            bf16=config.bf16,
            progress=lambda n: bar.advance(task, n),
        )
    targets = _teacher_targets(config, prompts, base_answers, work)

    rows = _trainable(start.rows if start is not None else initial_rows(base, tokenizer, config), config)
    model = _patch_model(config, base, tokenizer, rows, context)
    common = {"batch_size": config.batch_size, "seed": config.seed, "bf16": config.bf16}
    sft_items = [
        _Item(make_example(tokenizer, p.text, targets[p.text], _target_cap(config, p.harmful)), p.harmful)
        for p in prompts
        for _ in range(config.harmful_repeat if p.harmful else config.benign_repeat)
    ]
    sft_losses: list[float] = []
    if config.sft_epochs > 0:
        sft_losses = run_stage(
            "SFT",
            sft_items,
            lambda b: _sft_loss(model, b, config.benign_loss),
            rows,
            epochs=config.sft_epochs,
            lr=config.sft_lr,
            checkpoint=work / "sft.ckpt.safetensors",
            **common,
        )

    dpo_losses: list[float] = []
    if config.dpo_epochs > 0:
        pairs = refusal_pairs(config, model, tokenizer, prompts, targets, base_answers, counts, console)
        dpo_losses = _dpo_stage(config, model, rows, pairs, work / "dpo.ckpt.safetensors", console)

    what = (
        f"{config.placement} patch, SFT {config.sft_epochs} ep (benign {config.benign_loss}) "
        f"+ DPO {config.dpo_epochs} ep (beta {config.beta}, ref {config.reference}), teacher {config.teacher}"
    )
    report = work / "train-report.json"
    out, seconds = _finish(
        config, rows, fingerprint, what, start, report, started, counts, sft_losses, dpo_losses, console
    )
    return TrainResult(out, heldout_paths, seconds, sft_losses, dpo_losses, counts)


def _finish(
    config: TrainConfig,
    rows: torch.Tensor,
    fingerprint: str,
    what: str,
    start: Patch | None,
    report: Path,
    started: float,
    counts: dict[str, int],
    sft: list[float],
    dpo: list[float],
    console: Console,
) -> tuple[Path, float]:
    """Every task's last step: write the patch (described as ``what``, then where its rows started and the
    seed), write the training report, say so; returns the patch path and the run's seconds."""
    origin = f"continued from {start.ref} ({start.digest[:19]}…)" if start else f"{config.init} init"
    if config.stack_with:
        origin += f", trained after {', '.join(p.name for p in config.stack_with)} in its stack"
    out = _write_patch(config, rows, fingerprint, f"trained by patchserve: {what}, {origin}, seed {config.seed}")
    seconds = time.monotonic() - started
    _write_report(report, config, seconds, counts, sft, dpo, out)
    console.print(f"wrote {out} in {seconds / 60:.1f} min")
    return out, seconds


def _write_patch(config: TrainConfig, rows: torch.Tensor, fingerprint: str, description: str) -> Path:
    """Write the trained rows as a format-v1 patch (signed when ``config.key`` is set); returns its path."""
    out = config.out or config.work_dir / f"{config.name}-v{config.version}.safetensors"
    meta = PatchMetadata(
        name=config.name,
        version=config.version,
        base_model=fingerprint,
        domain=config.patch_domain,
        description=config.description or description,
        placement=config.placement,
    )
    data = dump_patch(rows.detach().to("cpu", torch.float32).clone(), meta)
    if config.key is not None:
        data = sign_patch(data, load_private_key(config.key))
    write_atomic(out, data)
    return out


def _write_report(
    path: Path,
    config: TrainConfig,
    seconds: float,
    counts: dict[str, int],
    sft: list[float],
    dpo: list[float],
    out: Path,
) -> None:
    report = {
        **{k: str(v) for k, v in asdict(config).items()},
        "seconds": seconds,
        "n_train": counts,
        "sft_final_loss": sft[-10:],
        "dpo_final_loss": dpo[-10:],
        "patch": str(out),
    }
    path.write_text(json.dumps(report, indent=2))
