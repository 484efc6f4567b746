"""`shoal replay TARGET --candidate NAME`: recorded requests asked again of another model or
route, compared with what was served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from shoal.cli.common import (
    FleetOption,
    TracesOption,
    err,
    fail,
    guard,
    out,
    parse_since,
    run_coroutine,
    trace_store,
    usd,
)
from shoal.errors import ConfigError
from shoal.fleet import Fleet

if TYPE_CHECKING:
    from shoal.compare import Comparison


def replay(
    target: Annotated[
        str, typer.Argument(help="The recorded route or PIPELINE/STEP (see `shoal recordings`).")
    ],
    candidate: Annotated[str, typer.Option(help="The model or route to ask instead.")],
    since: Annotated[
        str | None, typer.Option(help="Only recordings since then: 24h, 7d, or a date.")
    ] = None,
    served_by: Annotated[
        str | None, typer.Option("--served-by", help="Only answers served by this model.")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--file", help="Recordings from JSON Lines (with `gold` answers if known)."),
    ] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="The newest N recordings.")] = None,
    budget: Annotated[
        float | None, typer.Option(min=0.0, help="USD the candidate (and judge) may spend.")
    ] = None,
    agreement: Annotated[
        str, typer.Option(help="auto | exact | f1 | judge:MODEL (how answers are compared).")
    ] = "auto",
    table: Annotated[
        Path | None,
        typer.Option("--out", help="Outcome table to write (resumes from it; default: cache)."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw cost against quality to this PNG.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    fleet_file: FleetOption = None,
    traces: TracesOption = None,
) -> None:
    """Ask CANDIDATE the requests recorded for TARGET and compare its answers with those served:
    agreement, accuracy on gold answers where known, cost and latency. Resumable; each pair goes
    to an outcome table that `shoal route calibrate` can fit on."""
    from shoal.compare import Agreement, slug
    from shoal.engine import Engine
    from shoal.replay import plot as draw
    from shoal.replay import read_recordings
    from shoal.replay import replay as run_replay

    how = guard(lambda: Agreement.parse(agreement))
    if from_file is not None:
        rows = guard(lambda: read_recordings(from_file))
        rows = [(r, g) for r, g in rows if r.target == target or target == from_file.stem]
        fleet_store = None
    else:
        store, _ = trace_store(fleet_file, traces)
        when = parse_since(since) if since else None
        recorded = store.recordings(target, since=when, model=served_by)
        store.close()
        rows = [(r, None) for r in recorded]
        fleet_store = traces
    if n is not None:
        rows = rows[-n:]
    if not rows:
        where = from_file or "the trace store"
        raise fail(ConfigError(f"no recordings of {target!r} in {where}: see `shoal recordings`"))

    async def go() -> tuple[Comparison, Path]:
        from shoal.fleet import Fleet

        fleet = Fleet.from_file(fleet_file)
        engine = Engine(fleet, trace_path=fleet_store)
        path = table or fleet.cache_dir / "replays" / f"{slug(target)}--{slug(candidate)}.csv"
        try:
            with err.status(f"replaying {len(rows)} recordings of {target} on {candidate}"):
                report = await run_replay(
                    engine, rows, candidate, agreement=how, budget_usd=budget, table=path
                )
        finally:
            await engine.aclose()
        return report, path

    report, path = run_coroutine(go())
    summary = report.summary()
    if plot is not None:
        try:
            summary["plot"] = str(draw(report, plot))
        except ImportError:
            err.print("no plot: matplotlib is not installed (pip install 'shoal[bench]')")
    summary["table"] = str(path)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print(summary)


def _print(summary: dict[str, Any]) -> None:
    served, cand = summary["served"], summary["candidate_side"]
    table = Table("", f"served ({summary['target']})", f"candidate ({summary['candidate']})")

    def money(v: float | None) -> str:
        return "-" if v is None else usd(v)

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    table.add_row(
        "cost per call", money(served["cost_usd_per_call"]), money(cand["cost_usd_per_call"])
    )
    table.add_row("p50 latency", secs(served["p50_latency_s"]), secs(cand["p50_latency_s"]))
    table.add_row("p95 latency", secs(served["p95_latency_s"]), secs(cand["p95_latency_s"]))
    if "gold_accuracy" in served:
        table.add_row(
            "gold accuracy", f"{served['gold_accuracy']:.1%}", f"{cand['gold_accuracy']:.1%}"
        )
    out.print(table)
    agree = summary["agreement"]
    ratio = summary["cost_ratio"]
    out.print(
        f"agreement {agree:.1%} over {summary['compared']} requests"
        + (f" · cost {ratio:.1%} of served" if ratio is not None else "")
        + (f" · {summary['failed']} failed" if summary["failed"] else "")
        + (f" · {summary['resumed']} read back from the table" if summary["resumed"] else ""),
        highlight=False,
    )
    if summary["stopped"]:
        out.print(f"[yellow]stopped early:[/] {summary['stopped']}", highlight=False)
    out.print(f"outcome table: {summary['table']}", highlight=False)
    if "plot" in summary:
        out.print(f"plot: {summary['plot']}", highlight=False)


# `shoal route report NAME`: a route's shadow, compared (registered on the route commands).
from shoal.cli.route import route_app  # noqa: E402


@route_app.command("report")
def route_report(
    name: Annotated[str, typer.Argument(help="A route with a `shadow:` in the fleet file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    fleet_file: FleetOption = None,
) -> None:
    """How the route's shadow candidate would have done on the live requests it was asked:
    agreement with what the route served, cost and latency side by side."""
    from shoal.compare import Comparison, pairs_from_table
    from shoal.engine import Engine

    fleet = guard(lambda: Fleet.from_file(fleet_file))
    spec = next((r for r in fleet.settings.routes if r.name == name), None)
    if spec is None:
        known = ", ".join(r.name for r in fleet.settings.routes) or "none"
        raise fail(ConfigError(f"no route {name!r} in the fleet file (routes: {known})"))
    if spec.shadow is None:
        raise fail(ConfigError(f"route {name!r} has no shadow: add `shadow: {{candidate: ...}}`"))
    table = Engine.shadow_table(fleet, name, spec.shadow.candidate)
    if not table.exists():
        raise fail(ConfigError(f"no shadow answers yet for {name!r} (they are written to {table})"))
    report = Comparison(name, spec.shadow.candidate, pairs_from_table(table, spec.shadow.candidate))
    summary = report.summary() | {"table": str(table)}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print(summary)
