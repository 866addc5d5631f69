"""``patchserve import-peft`` and ``export-peft``: PEFT prompt-tuning adapters to patch files and back (see
:mod:`patches.peft_interop`), registered on the CLI app by :mod:`patches.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patches.basemodel import prepare_default_model
from patches.cli_common import app, console
from patches.cli_common import fail as _fail
from patches.errors import ConversionError, PatchRejected
from patches.fingerprint import ModelSpec


def _spec(model: Path | None) -> tuple[Path, ModelSpec]:
    from patches.fingerprint import model_spec

    model_dir = model or prepare_default_model()
    try:
        return model_dir, model_spec(model_dir)
    except (OSError, KeyError, ValueError) as exc:
        _fail(f"cannot read the model: {exc}")


@app.command("import-peft")
def import_peft(
    adapter_dir: Annotated[Path, typer.Argument(help="PEFT prompt-tuning adapter directory (save_pretrained)")],
    name: Annotated[str, typer.Option(help="Patch name")],
    version: Annotated[int, typer.Option(min=1, help="Patch version")],
    key: Annotated[Path | None, typer.Option(help="Ed25519 private key to sign with")] = None,
    out: Annotated[Path | None, typer.Option(help="Patch file (default: NAME-vVERSION.safetensors)")] = None,
    model: Annotated[Path | None, typer.Option(help="Base model dir (default: the embedded model)")] = None,
    accept_base: Annotated[
        str | None, typer.Option(help="Accept this base_model_name_or_path (a Hub id, no local dir) as --model")
    ] = None,
    description: Annotated[str | None, typer.Option(help="Patch description")] = None,
) -> None:
    """Write a PROMPT_TUNING adapter as a format-v1 prefix patch; refuse other PEFT methods and other models."""
    from patches import peft_interop
    from patches.format import PatchMetadata, content_digest, read_patch, write_atomic
    from patches.signing import load_private_key

    _, spec = _spec(model)
    try:
        private_key = load_private_key(key) if key is not None else None
    except (OSError, ValueError) as exc:
        _fail(f"cannot use signing key: {exc}")
    try:
        adapter = peft_interop.read_adapter(adapter_dir)
        n_tokens = adapter.config.num_virtual_tokens
        text = description if description is not None else f"imported from PEFT prompt tuning ({n_tokens} tokens)"
        meta = PatchMetadata(name=name, version=version, base_model=spec.fingerprint, description=text)
        data = peft_interop.adapter_to_patch(adapter, meta=meta, expect=spec, accept_base=accept_base, key=private_key)
    except PatchRejected as exc:
        _fail(f"[{exc.reason}] {exc}")
    except ConversionError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot read {adapter_dir}: {exc}")
    target = out or Path(f"{name}-v{version}.safetensors")
    try:
        write_atomic(target, data)
    except OSError as exc:
        _fail(f"cannot write {target}: {exc.strerror}")
    meta, tensor, raw = read_patch(data)
    typer.echo(f"ref     {meta.ref}")
    typer.echo(f"shape   {' x '.join(map(str, tensor.shape))} {str(tensor.dtype).removeprefix('torch.')}")
    typer.echo(f"digest  {content_digest(raw, tensor)}")
    typer.echo(f"signer  {meta.signer or 'unsigned'}")
    typer.echo(f"file    {target}")


@app.command("export-peft")
def export_peft(
    patch: Annotated[Path, typer.Argument(help="Prefix patch file")],
    out_dir: Annotated[Path, typer.Argument(help="Directory for adapter_config.json + adapter_model.safetensors")],
    model: Annotated[Path | None, typer.Option(help="Base model dir (default: the embedded model)")] = None,
    base_model_name: Annotated[
        str | None, typer.Option(help="base_model_name_or_path to write (default: the --model directory)")
    ] = None,
) -> None:
    """Write a prefix patch as a PEFT prompt-tuning adapter that PeftModel.from_pretrained loads."""
    from patches import peft_interop

    model_dir, spec = _spec(model)
    try:
        data = patch.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {patch}: {exc.strerror}")
    try:
        adapter = peft_interop.patch_to_adapter(
            data, expect=spec, base_model_name=base_model_name or str(model_dir.resolve())
        )
    except PatchRejected as exc:
        _fail(f"[{exc.reason}] {exc}")
    except ConversionError as exc:
        _fail(str(exc))
    try:
        written = peft_interop.write_adapter(adapter, out_dir)
    except OSError as exc:
        _fail(f"cannot write {out_dir}: {exc}")
    console.print(f"exported {adapter.metadata[peft_interop.PATCH_REF_KEY]}: " + ", ".join(map(str, written)))
