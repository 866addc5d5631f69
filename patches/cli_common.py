"""What every ``patchserve`` command module shares: the Typer app, the console and the failure exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="patchserve: signed safety patches for LLM serving.")
console = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` to stderr and exit with ``code`` (2: unusable input)."""
    typer.echo(message, err=True)
    raise typer.Exit(code)
