"""The ``patchserve`` command line: model preparation, patch files, signing keys and audits.

Exit codes: 0 success (``diff``: identical), 1 verification failed (``diff``: differences found; ``push``,
``rollback``: refused by the server), 2 unusable input (missing or malformed file, bad key, wrong file kind,
no or wrong admin token), 3 a server did not answer or failed (``push``, ``status``, ``rollback``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Literal, cast

import typer
from rich.console import Console
from rich.table import Table

from patches.basemodel import default_cache_dir, prepare_default_model
from patches.cli_common import app, console
from patches.cli_common import fail as _fail
from patches.errors import PatchRejected, TenantConfigError


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


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")


@app.command("keygen")
def keygen(
    out_dir: Annotated[Path, typer.Argument(help="Directory for <name>.key (private, 0600) and <name>.pub")],
    name: Annotated[str, typer.Option(help="Base name of the key files")],
    ec: Annotated[bool, typer.Option("--ec", help="An EC P-256 pair for OMS bundles (sign --oms) instead")] = False,
) -> None:
    """Create an Ed25519 signing key pair (or with --ec an EC P-256 one) and print its key id."""
    from patches.oms import generate_ec_keypair, load_trusted_key, trusted_key_id
    from patches.signing import generate_keypair

    try:
        private_path, public_path = (generate_ec_keypair if ec else generate_keypair)(out_dir, name)
    except (ValueError, FileExistsError) as exc:
        _fail(str(exc))
    typer.echo(f"key id  {trusted_key_id(load_trusted_key(public_path))}")
    typer.echo(f"private {private_path}")
    typer.echo(f"public  {public_path}")


@app.command("sign")
def sign(
    patch: Annotated[Path, typer.Argument(help="Patch file to sign")],
    key: Annotated[Path, typer.Option(help="Ed25519 private key (PEM PKCS8); with --oms an EC one")],
    out: Annotated[
        Path | None, typer.Option(help="Write the signed file (with --oms: the bundle) here (default: in place)")
    ] = None,
    oms: Annotated[
        bool, typer.Option("--oms", help="Write a detached OMS bundle PATCH.sig instead; the file is unchanged")
    ] = False,
) -> None:
    """Sign a patch file (replacing any older signature) and print its ref, content digest and signer."""
    from patches.format import content_digest, read_patch, write_atomic
    from patches.signing import load_private_key, sign_patch

    data = _read(patch)
    if oms:
        _sign_oms(patch, key, out)
        return
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


def _sign_oms(patch: Path, key: Path, out: Path | None) -> None:
    from patches.format import content_digest, read_patch
    from patches.oms import sign_bundle

    try:
        bundle, signer = sign_bundle(patch, key, out)
    except PatchRejected as exc:
        _fail(f"[{exc.reason}] {exc}")
    except ValueError as exc:
        _fail(f"cannot sign with {key}: {exc}")
    except OSError as exc:
        _fail(f"cannot sign {patch}: {exc.strerror or exc}")
    meta, tensor, raw = read_patch(_read(patch))
    typer.echo(f"ref     {meta.ref}")
    typer.echo(f"digest  {content_digest(raw, tensor)}")
    typer.echo(f"signer  {signer}")
    typer.echo(f"bundle  {bundle}")


@app.command("verify")
def verify(
    patch: Annotated[Path, typer.Argument(help="Patch file to verify")],
    trust: Annotated[Path, typer.Option(help="Directory of trusted *.pub keys (Ed25519, and EC for OMS bundles)")],
    revocations: Annotated[Path | None, typer.Option(help="Revocation list (YAML)")] = None,
    model: Annotated[Path | None, typer.Option(help="Model dir (default: the embedded model)")] = None,
) -> None:
    """Verify a patch against trusted keys, revocations and a model: exit 0 if it would be served, else 1."""
    from patches.fingerprint import model_spec
    from patches.oms import read_bundle
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
        bundle = read_bundle(patch)  # PATCH.sig beside it: the OMS bundle decides (patches.oms)
        result = Verifier(store, revoked).verify(_read(patch), expect=spec, bundle=bundle)
    except PatchRejected as exc:
        _fail(f"[{exc.reason}] {exc}", code=1)
    except OSError as exc:
        _fail(f"cannot read the OMS bundle of {patch}: {exc.strerror}")
    typer.echo(f"OK {result.ref} signed by {result.meta.signer}" + (" (OMS bundle)" if bundle is not None else ""))


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
    patches: Annotated[
        Path | None,
        typer.Option("--patches", help="tenant files: patch directory to name what each stack change guards against"),
    ] = None,
) -> None:
    """Compare two patch files or two tenant files: one sentence per change; exit 1 if any, 0 if identical."""
    from patches.audit import diff_patches, diff_tenants, patch_catalog
    from patches.tenants import load_tenants

    kind_a, kind_b = _kind(a), _kind(b)
    if kind_a != kind_b:
        _fail(f"cannot compare a {kind_a} file with a {kind_b} file")
    try:
        if kind_a == "patch":
            changes = diff_patches(_read(a), _read(b))
        else:
            if patches is not None and not patches.is_dir():
                _fail(f"--patches {patches}: not a directory")
            catalog = patch_catalog(patches) if patches is not None else None
            changes = diff_tenants(load_tenants(a), load_tenants(b), catalog)
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


from patches import cli_peft  # noqa: E402, F401, I001 - registers import-peft, export-peft
from patches import cli_training  # noqa: E402, F401 - registers train, eval, bias-sets, continuation-sets, eval-sets
from patches import cli_ops  # noqa: E402, F401 - registers push, status, rollback (over the admin API)

if __name__ == "__main__":
    app()
