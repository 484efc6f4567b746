"""`shoal serve` and `shoal keys ...`: the OpenAI-compatible server and its API keys
(registered by cli/main.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Column, Table

from shoal.cli.common import FleetOption, err, out
from shoal.errors import ConfigError

keys_app = typer.Typer(
    help="API keys of the server: budgets and rate limits.", no_args_is_help=True
)

KeysOption = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        envvar="SHOAL_KEYS",
        help="API keys file (default: keys.sqlite in the fleet's cache folder).",
    ),
]


def _keys_path(keys: Path | None, fleet_file: Path | None) -> Path:
    if keys is not None:
        return keys
    from shoal.cli.common import fleet_from as _fleet
    from shoal.server.state import KEYS_FILE

    return _fleet(fleet_file).cache_dir / KEYS_FILE


def serve(
    fleet_file: FleetOption = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    keys: KeysOption = None,
    no_auth: Annotated[
        bool,
        typer.Option("--no-auth", help="Serve without API keys: anyone who reaches it spends."),
    ] = False,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, help="Larger request bodies are refused (413).")
    ] = 1 << 20,
    log_prompts: Annotated[
        bool, typer.Option("--log-prompts", help="Log prompts and answers (never by default).")
    ] = False,
    traces: Annotated[
        Path | None, typer.Option(help="Trace store (default: traces.sqlite in the cache folder).")
    ] = None,
) -> None:
    """Serve the fleet (and its routes) over an OpenAI-compatible HTTP API."""
    import uvicorn

    from shoal.cli.common import fleet_from as _fleet
    from shoal.cli.common import guard as _guard
    from shoal.engine import TRACES_FILE, Engine
    from shoal.server import create_app
    from shoal.settings import ServerSettings
    from shoal.traces.background import DeferredTraceStore

    try:
        settings = ServerSettings(
            host=host,
            port=port,
            auth=not no_auth,
            keys_path=keys,
            max_body_bytes=max_body_bytes,
            log_prompts=log_prompts,
        )
    except ValidationError as exc:
        problem = ConfigError(f"invalid server settings: {exc}")
        _guard(lambda: _raise(problem))
        return
    fleet = _fleet(fleet_file)
    trace_path = traces or fleet.cache_dir / TRACES_FILE
    # Trace rows are committed just after each response, not before it.
    engine = _guard(lambda: Engine(fleet, traces=DeferredTraceStore(trace_path)))
    app = create_app(engine, settings, close_engine=True)
    where = "no API keys" if no_auth else f"keys in {keys or fleet.cache_dir / 'keys.sqlite'}"
    err.print(
        f"shoal: {len(engine.names)} models and routes on http://{host}:{port}/v1 ({where})",
        highlight=False,
    )
    if no_auth and host not in ("127.0.0.1", "localhost", "::1"):
        err.print("[bold yellow]warning:[/] serving beyond loopback without API keys")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # clients connect directly (no trusted proxy in front)
        lifespan="on",
    )


def _raise(exc: Exception) -> None:
    raise exc


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key (unique).")],
    budget: Annotated[
        float | None, typer.Option(min=0.0, help="Budget in USD (default: none).")
    ] = None,
    rpm: Annotated[
        int | None, typer.Option(min=1, help="Requests per minute (default: any).")
    ] = None,
    keys: KeysOption = None,
    fleet_file: FleetOption = None,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from shoal.server.keys import KeyStore

    store = KeyStore(_keys_path(keys, fleet_file))
    try:
        key, record = store.create(name, budget_usd=budget, rpm=rpm)
    except ValueError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        store.close()
    typer.echo(key)
    limits = f"budget ${budget:g}" if budget is not None else "no budget"
    limits += f", {rpm} requests/min" if rpm is not None else ", no rate limit"
    err.print(
        f"key {record.name!r} ({record.id}): {limits}; it is not shown again", highlight=False
    )


@keys_app.command("list")
def keys_list(keys: KeysOption = None, fleet_file: FleetOption = None) -> None:
    """Every key: name, budget, spent, requests, rate limit (never the key)."""
    from shoal.server.keys import KeyStore

    store = KeyStore(_keys_path(keys, fleet_file))
    try:
        records = store.records()
    finally:
        store.close()
    table = Table(
        Column("name", no_wrap=True),
        Column("id", no_wrap=True),
        Column("key", no_wrap=True),
        "budget $",
        "spent $",
        "requests",
        "rpm",
        "created",
    )
    for r in records:
        table.add_row(
            r.name + (" [red](revoked)[/]" if r.revoked else ""),
            r.id,
            r.hint + "…",
            "-" if r.budget_usd is None else f"{r.budget_usd:g}",
            f"{r.spent_usd:.6f}",
            str(r.requests),
            "-" if r.rpm is None else str(r.rpm),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)),
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    keys: KeysOption = None,
    fleet_file: FleetOption = None,
) -> None:
    """Revoke a key (a running server refuses it within seconds)."""
    from shoal.server.keys import KeyStore

    store = KeyStore(_keys_path(keys, fleet_file))
    try:
        found = store.revoke(name)
    finally:
        store.close()
    if not found:
        err.print(f"[bold red]error:[/] no key named {name!r}", highlight=False)
        raise typer.Exit(2)
    err.print(f"key {name!r} revoked", highlight=False)
