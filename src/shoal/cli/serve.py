"""`shoal serve` and `shoal keys ...`: the OpenAI-compatible server and its API keys
(registered by cli/main.py)."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.table import Column, Table

from shoal.cli.common import FleetOption, err, out, usd
from shoal.errors import ConfigError, ShoalError

if TYPE_CHECKING:
    from shoal.fleet import Fleet
    from shoal.server.keys import KeyRecord
    from shoal.settings import ServerSettings

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


# Collections of the youngest generation are cheap; full ones walk every object the process
# holds (tens of milliseconds with the fleet and its libraries loaded), and a request in flight
# waits for them: the tail of the latency at concurrency 16 was mostly these pauses.
GC_YOUNG_THRESHOLD = 50_000


def quiet_garbage_collector() -> None:
    """Keep the garbage collector off the request path's tail: what was loaded at start-up is
    frozen out of every later collection, and the youngest generation collects less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def serve(
    fleet_file: FleetOption = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    keys: KeysOption = None,
    no_auth: Annotated[
        bool,
        typer.Option("--no-auth", help="Serve without API keys: anyone who reaches it spends."),
    ] = False,
    public: Annotated[
        bool,
        typer.Option(
            "--public", help="Allow a --host beyond loopback (e.g. 0.0.0.0); needs API keys."
        ),
    ] = False,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM; with --tls-key).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="The certificate's private key (PEM; with --tls-cert).")
    ] = None,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, help="Larger request bodies are refused (413).")
    ] = 1 << 20,
    log_prompts: Annotated[
        bool, typer.Option("--log-prompts", help="Log prompts and answers (never by default).")
    ] = False,
    metrics_auth: Annotated[
        bool, typer.Option("--metrics-auth", help="/metrics needs an API key (open by default).")
    ] = False,
    traces: Annotated[
        Path | None, typer.Option(help="Trace store (default: traces.sqlite in the cache folder).")
    ] = None,
    pipeline: Annotated[
        list[str] | None,
        typer.Option(
            "--pipeline",
            help="Serve this pipeline at /v1/pipelines/NAME/runs: a registered name (`shoal "
            "pipelines list`) or a YAML file; repeatable. None by default.",
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Serve on a Ray cluster (the shoal[ray] extra): 'auto' joins the cluster of "
            "this node (`ray start`), an ADDRESS the one whose head is there, 'local' starts "
            "one for this server. Gateway replicas behind Serve's proxy share one key ledger.",
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Gateway replicas on Ray (with --ray).")] = 2,
) -> None:
    """Serve the fleet (and its routes) over an OpenAI-compatible HTTP API, and the pipelines
    named with --pipeline."""
    import uvicorn

    from shoal.cli.common import fail as _fail
    from shoal.cli.common import fleet_from as _fleet
    from shoal.cli.common import guard as _guard
    from shoal.engine import TRACES_FILE, Engine
    from shoal.server import create_app
    from shoal.settings import ServerSettings, is_loopback
    from shoal.traces.background import DeferredTraceStore

    try:
        settings = ServerSettings(
            host=host,
            port=port,
            auth=not no_auth,
            keys_path=keys,
            public=public,
            tls_cert=tls_cert,
            tls_key=tls_key,
            max_body_bytes=max_body_bytes,
            log_prompts=log_prompts,
            metrics_auth=metrics_auth,
            pipelines=tuple(pipeline or ()),
        )
    except ValidationError as exc:
        problem = ConfigError(f"invalid server settings: {_problems(exc)}")
        _guard(lambda: _raise(problem))
        return
    fleet = _fleet(fleet_file)
    trace_path = traces or fleet.cache_dir / TRACES_FILE
    if ray is not None:
        _guard(lambda: serve_on_ray(fleet, settings, ray, replicas=replicas, traces=trace_path))
        return
    # Trace rows are committed just after each response, not before it.
    engine = _guard(lambda: Engine(fleet, traces=DeferredTraceStore(trace_path)))
    try:  # a second server on the same keys file stops here (KeysInUseError)
        app = create_app(engine, settings, close_engine=True)
    except ShoalError as exc:
        asyncio.run(engine.aclose())
        raise _fail(exc) from None
    where = "no API keys" if no_auth else f"keys in {keys or fleet.cache_dir / 'keys.sqlite'}"
    scheme = "https" if tls_cert else "http"
    err.print(
        f"shoal: {len(engine.names)} models and routes on {scheme}://{host}:{port}/v1 ({where})",
        highlight=False,
    )
    served = app.state.shoal.runs.pipelines
    if served:
        err.print(
            f"shoal: pipelines {', '.join(served)} at /v1/pipelines/NAME/runs", highlight=False
        )
    if not tls_cert and not is_loopback(host):
        err.print("[bold yellow]warning:[/] API keys cross the network in clear (no --tls-cert)")
    quiet_garbage_collector()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # clients connect directly (no trusted proxy in front)
        lifespan="on",
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )


def serve_on_ray(
    fleet: Fleet, settings: ServerSettings, address: str, *, replicas: int, traces: Path
) -> None:
    """`shoal serve --ray`: the gateway as a Ray Serve ingress of `replicas` replicas, behind
    Serve's proxy on the settings' host and port, until interrupted."""
    if settings.tls_cert is not None:
        raise ConfigError(
            "--tls-cert with --ray: Serve's proxy speaks plain HTTP; put a TLS proxy in front"
        )
    from shoal.backends.ray_cluster import connect, import_ray, start_serve
    from shoal.server.ray_gateway import run_gateway

    connect(None if address == "local" else address)
    # Stopped by a service manager (SIGTERM) as by Ctrl-C: what was started here is removed.
    signal.signal(signal.SIGTERM, _interrupt)
    ray = import_ray()
    from ray import serve

    gateway = None
    try:
        start_serve(settings.host, settings.port)
        gateway = run_gateway(fleet.settings, settings, replicas=replicas, trace_path=traces)
        where = f"http://{settings.host}:{settings.port}/v1"
        err.print(f"shoal: {replicas} gateway replicas on Ray at {where}", highlight=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if gateway is not None:
            gateway.stop()
        if address == "local":  # its own cluster; a joined one keeps Serve and its models
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _raise(exc: Exception) -> None:
    raise exc


def _problems(exc: ValidationError) -> str:
    """A settings error as one line a user reads: each problem's field and message."""
    problems = []
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        message = str(cause) if error["type"] == "value_error" and cause else error["msg"]
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key (unique).")],
    budget: Annotated[
        float | None, typer.Option(min=0.0, help="Budget in USD (default: none).")
    ] = None,
    rpm: Annotated[
        int | None, typer.Option(min=1, help="Requests per minute (default: any).")
    ] = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="The key also signs in to the dashboard (/ui).")
    ] = False,
    keys: KeysOption = None,
    fleet_file: FleetOption = None,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from shoal.server.keys import KeyStore

    store = KeyStore(_keys_path(keys, fleet_file))
    try:
        key, record = store.create(name, budget_usd=budget, rpm=rpm, admin=admin)
    except ValueError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        store.close()
    typer.echo(key)
    limits = f"budget ${budget:g}" if budget is not None else "no budget"
    limits += f", {rpm} requests/min" if rpm is not None else ", no rate limit"
    limits += ", admin (signs in to /ui)" if admin else ""
    err.print(
        f"key {record.name!r} ({record.id}): {limits}; it is not shown again", highlight=False
    )


TEXT_WIDTH = 6


@keys_app.command("list")
def keys_list(
    keys: KeysOption = None,
    fleet_file: FleetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every key: name, budget, spent, requests, rate limit, admin (never the key)."""
    from shoal.server.keys import KeyStore

    store = KeyStore(_keys_path(keys, fleet_file))
    try:
        records = store.records()
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([_key_json(r) for r in records], indent=2))
        return
    budgets = ["-" if r.budget_usd is None else usd(r.budget_usd) for r in records]
    spent = [usd(r.spent_usd) for r in records]

    def figure(header: str, cells: list[str]) -> Column:
        # Never cut or wrapped: a figure cut short reads as another figure.
        width = max(map(len, [header, *cells]))
        return Column(header, justify="right", no_wrap=True, min_width=width)

    rows = [
        (
            r.name + (" [red](revoked)[/]" if r.revoked else ""),
            r.id,
            r.hint + "…",
            budget,
            paid,
            str(r.requests),
            "-" if r.rpm is None else str(r.rpm),
            "yes" if r.admin else "-",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)),
        )
        for r, budget, paid in zip(records, budgets, spent, strict=True)
    ]
    figures = [
        figure("budget", budgets),
        figure("spent", spent),
        figure("requests", [row[5] for row in rows]),
        figure("rpm", [row[6] for row in rows]),
        figure("admin", [row[7] for row in rows]),
    ]
    texts = [Column(header, overflow="fold") for header in ("name", "id", "key", "created")]
    table = Table(*texts[:3], *figures, texts[3])
    for row in rows:
        table.add_row(*row)
    # Each text column folds to no fewer than TEXT_WIDTH characters a line; each column takes
    # three more for its padding and border.
    needed = sum(c.min_width or 0 for c in figures) + len(texts) * TEXT_WIDTH
    if needed + 3 * len(table.columns) + 1 <= out.width:
        out.print(table)
        return
    # Too narrow for the table: one block per key, a field a line.
    headers = [str(c.header) for c in table.columns]
    for row in rows:
        block = Table.grid(padding=(0, 1))
        block.add_column(style="bold", no_wrap=True)
        block.add_column(overflow="fold")
        for header, cell in zip(headers, row, strict=True):
            block.add_row(header, cell)
        out.print(block)
        out.print()


def _key_json(record: KeyRecord) -> dict[str, object]:
    """A key for scripts: stable field names, money in USD as numbers, time in ISO 8601."""
    created = datetime.fromtimestamp(record.created_at, UTC).isoformat(timespec="seconds")
    return {
        "name": record.name,
        "id": record.id,
        "hint": record.hint,
        "budget_usd": record.budget_usd,
        "spent_usd": record.spent_usd,
        "requests": record.requests,
        "rpm": record.rpm,
        "revoked": record.revoked,
        "admin": record.admin,
        "created_at": created,
    }


@keys_app.command("update")
def keys_update(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    budget: Annotated[float | None, typer.Option(help="A new budget in USD.")] = None,
    no_budget: Annotated[bool, typer.Option("--no-budget", help="No budget at all.")] = False,
    rpm: Annotated[int | None, typer.Option(help="A new limit of requests per minute.")] = None,
    no_rpm: Annotated[bool, typer.Option("--no-rpm", help="No rate limit at all.")] = False,
    reset_spend: Annotated[
        bool, typer.Option("--reset-spend", help="Start the key's spend from zero.")
    ] = False,
    keys: KeysOption = None,
    fleet_file: FleetOption = None,
) -> None:
    """Change a key's budget or rate limit, or reset its spend (a running server applies it
    from the key's next request)."""
    from shoal.server.keys import KeyStore

    problem = None
    if budget is not None and no_budget:
        problem = "give --budget or --no-budget, not both"
    elif rpm is not None and no_rpm:
        problem = "give --rpm or --no-rpm, not both"
    elif budget is None and not no_budget and rpm is None and not no_rpm and not reset_spend:
        problem = "nothing to change: give --budget, --no-budget, --rpm, --no-rpm or --reset-spend"
    if problem is not None:
        err.print(f"[bold red]error:[/] {problem}", highlight=False)
        raise typer.Exit(2)
    store = KeyStore(_keys_path(keys, fleet_file))
    try:
        record = store.update(
            name,
            budget_usd=None if no_budget else (... if budget is None else budget),
            rpm=None if no_rpm else (... if rpm is None else rpm),
            reset_spend=reset_spend,
        )
    except ValueError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        store.close()
    if record is None:
        err.print(f"[bold red]error:[/] no key named {name!r}", highlight=False)
        raise typer.Exit(2)
    limits = "no budget" if record.budget_usd is None else f"budget {usd(record.budget_usd)}"
    limits += ", no rate limit" if record.rpm is None else f", {record.rpm} requests/min"
    err.print(f"key {name!r}: {limits}, {usd(record.spent_usd)} spent", highlight=False)


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    keys: KeysOption = None,
    fleet_file: FleetOption = None,
) -> None:
    """Revoke a key (a running server refuses it from its next request)."""
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
