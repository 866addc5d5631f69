"""``patchserve push``, ``status`` and ``rollback``: operator commands over the admin API of running
replicas (:mod:`patches.admin_client`), registered on the CLI app by :mod:`patches.cli`.

Replicas come from ``--url`` (repeatable, or comma-separated) or ``PATCHSERVE_URL`` (comma-separated),
default ``http://127.0.0.1:8000``; the admin token from ``--token`` or ``PATCHSERVE_ADMIN_TOKEN``.
Exit codes: 0 done; 1 refused by a replica (a rejected patch, an unknown version, a version in use);
2 unusable input (unreadable file, no or wrong admin token); 3 a replica did not answer or failed (5xx,
still starting).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from patches.admin_client import DEFAULT_URL, AdminAPIError, AdminClient, Listing, PatchInfo
from patches.cli_common import app, console
from patches.cli_common import fail as _fail

EXIT_REFUSED, EXIT_INPUT, EXIT_UNAVAILABLE = 1, 2, 3
URL_ENV, TOKEN_ENV = "PATCHSERVE_URL", "PATCHSERVE_ADMIN_TOKEN"

UrlOption = Annotated[
    list[str] | None,
    typer.Option("--url", help=f"Replica base URL; repeatable or comma-separated (default: ${URL_ENV}, {DEFAULT_URL})"),
]
TokenOption = Annotated[
    str | None, typer.Option("--token", envvar=TOKEN_ENV, help="Admin bearer token", show_default=False)
]


def _urls(given: list[str] | None) -> list[str]:
    raw = given if given else [os.environ.get(URL_ENV) or DEFAULT_URL]
    urls = [u.strip().rstrip("/") for item in raw for u in item.split(",") if u.strip()]
    if not urls:
        _fail(f"no replica URL: pass --url or set {URL_ENV}", EXIT_INPUT)
    for url in urls:
        if not url.startswith(("http://", "https://")):
            _fail(f"replica URL {url!r} must start with http:// or https://", EXIT_INPUT)
    return urls


def _token(token: str | None) -> str:
    if not token:
        _fail(f"no admin token: set {TOKEN_ENV} or pass --token", EXIT_INPUT)
    return token


def _exit_code(error: AdminAPIError) -> int:
    if error.status is None or error.status >= 500:
        return EXIT_UNAVAILABLE
    if error.status in (401, 403):
        return EXIT_INPUT
    return EXIT_REFUSED


def _explain(error: AdminAPIError) -> str:
    """One line: the replica, the refusal reason (``param``) when there is one, the server's message."""
    reason = f"[{error.param}] " if error.param else ""
    hint = f" (check --token or {TOKEN_ENV})" if error.status in (401, 403) else ""
    status = f"HTTP {error.status}: " if error.status is not None else ""
    return f"{error.url}: {status}{reason}{error}{hint}"


def _one(urls: list[str], command: str) -> str:
    if len(urls) > 1:
        _fail(
            f"{command} talks to one replica (the others load from the shared patch directory and version "
            f"ledger), got {len(urls)} URLs: pass one --url, then check them all with `patchserve status`",
            EXIT_INPUT,
        )
    return urls[0]


def _cells(*values: object) -> list[Text]:
    return [Text("" if v is None else str(v)) for v in values]  # Text: server messages are never rich markup


def _patch_table(title: str, rows: Iterator[tuple[str, PatchInfo]]) -> Table:
    table = Table(title=title)
    for column in ("replica", "patch", "sha256", "signer", "rows", "tenants", "source", "loaded at"):
        table.add_column(column, overflow="fold")
    for url, p in rows:
        patch, digest, tenants = f"{p.name}@{p.version}", p.sha256[:19] + "…", ", ".join(p.tenants) or "-"
        table.add_row(*_cells(url, patch, digest, p.signer or "unsigned", p.n_tokens, tenants, p.source, p.loaded_at))
    return table


@app.command("push")
def push(
    patch: Annotated[Path, typer.Argument(help="Signed patch file to upload")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Upload a signed patch file through a replica's admin API; it is verified there, then served."""
    target, secret = _one(_urls(url), "push"), _token(token)
    try:
        data = patch.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {patch}: {exc.strerror}", EXIT_INPUT)
    try:
        with AdminClient(target, secret) as client:
            info = client.upload(data)
    except AdminAPIError as exc:
        _fail(f"push refused: {_explain(exc)}", _exit_code(exc))
    console.print(_patch_table(f"pushed {info.name}@{info.version}", iter([(target, info)])))


@app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Patch name")],
    version: Annotated[int, typer.Argument(help="Version to go back to (it must be loaded)", min=1)],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Roll a patch back to an older loaded version on a replica; newer versions are withdrawn for good."""
    target, secret = _one(_urls(url), "rollback"), _token(token)
    try:
        with AdminClient(target, secret) as client:
            result = client.roll_back(name, version)
    except AdminAPIError as exc:
        _fail(f"rollback refused: {_explain(exc)}", _exit_code(exc))
    table = Table(title=f"rolled {name} back to {name}@{version}")
    for column in ("replica", "serving", "withdrawn"):
        table.add_column(column, overflow="fold")
    table.add_row(*_cells(target, f"{result.name}@{result.version}", ", ".join(result.withdrawn) or "none"))
    console.print(table)


def _listings(urls: list[str], token: str) -> tuple[dict[str, Listing], dict[str, AdminAPIError]]:
    listings: dict[str, Listing] = {}
    errors: dict[str, AdminAPIError] = {}
    for url in urls:
        try:
            with AdminClient(url, token) as client:
                listings[url] = client.listing()
        except AdminAPIError as exc:
            errors[url] = exc
    return listings, errors


def _replica_table(urls: list[str], listings: dict[str, Listing], errors: dict[str, AdminAPIError]) -> Table:
    table = Table(title="replicas")
    for column in ("replica", "answer", "versions loaded", "ledger serial", "problems"):
        table.add_column(column, overflow="fold")
    for url in urls:
        if url in errors:
            table.add_row(*_cells(url, "ERROR", "", "", _explain(errors[url])))
            continue
        listing = listings[url]
        problems = [p for p in (listing.state_error, listing.tenant_config_error) if p]
        table.add_row(*_cells(url, "ok", len(listing.patches), listing.state_serial, "; ".join(problems) or "-"))
    return table


def _version_table(listings: dict[str, Listing]) -> Table:
    table = Table(title="version floors and withdrawn versions")
    for column in ("replica", "patch", "floor", "withdrawn"):
        table.add_column(column, overflow="fold")
    for url, listing in listings.items():
        for name in sorted(set(listing.version_floors) | set(listing.withdrawn_versions)):
            withdrawn = ", ".join(str(v) for v in listing.withdrawn_versions.get(name, [])) or "-"
            table.add_row(*_cells(url, name, listing.version_floors.get(name, "-"), withdrawn))
    return table


def _rejection_table(listings: dict[str, Listing]) -> Table:
    table = Table(title="refused files")
    for column in ("replica", "source", "reason", "message", "at"):
        table.add_column(column, overflow="fold")
    for url, listing in listings.items():
        for r in listing.rejections:
            table.add_row(*_cells(url, r.source, r.reason, r.message, r.at))
    return table


@app.command("status")
def status(url: UrlOption = None, token: TokenOption = None) -> None:
    """Per replica: loaded patch versions, refused files, version floors and withdrawn versions."""
    urls, secret = _urls(url), _token(token)
    listings, errors = _listings(urls, secret)
    console.print(_replica_table(urls, listings, errors))
    if listings:
        rows = ((u, p) for u, listing in listings.items() for p in listing.patches)
        console.print(_patch_table("loaded patch versions", rows))
        console.print(_version_table(listings))
        if any(listing.rejections for listing in listings.values()):
            console.print(_rejection_table(listings))
    served = {u: {(p.name, p.version, p.sha256) for p in listing.patches} for u, listing in listings.items()}
    if len(set(map(frozenset, served.values()))) > 1:
        console.print("[yellow]replicas differ in what they serve[/yellow] (a rollout in progress, or a stuck replica)")
    for error in errors.values():
        typer.echo(_explain(error), err=True)
    if errors:
        raise typer.Exit(max(_exit_code(e) for e in errors.values()))
