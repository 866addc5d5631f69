"""The ``patchserve`` command line: model preparation, patch files and tenant keys."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from patches.basemodel import default_cache_dir, prepare_default_model

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
) -> None:
    """Write the untrained, text-initialised demo patch (DEMO ONLY) for a model."""
    from patches.demo import write_demo_patch

    console.print(str(write_demo_patch(model or prepare_default_model(), patch_dir)))


@app.command("hash-key")
def hash_key(key: Annotated[str, typer.Argument(help="An API key to store in a tenant file")]) -> None:
    """Print the ``sha256:<hex>`` form of an API key for the tenant file's ``api_keys``."""
    from patches.tenants import hash_api_key

    console.print(hash_api_key(key))


if __name__ == "__main__":
    app()
