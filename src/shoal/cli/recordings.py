"""`shoal recordings`: what routes and pipeline steps recorded for distillation (opt-in with
`record: true`), exported as training data, or deleted."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shoal.cli.common import FleetOption, TracesOption, out, parse_since, trace_store

recordings_app = typer.Typer(
    help="Requests and answers recorded for distillation (routes and steps with record: true).",
    no_args_is_help=True,
)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M")


@recordings_app.command("list")
def recordings_list(
    fleet_file: FleetOption = None,
    traces: TracesOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Each recorded target: how many answers, from which models, over what time."""
    store, _ = trace_store(fleet_file, traces)
    targets = store.recorded_targets()
    store.close()
    if as_json:
        typer.echo(json.dumps([t.__dict__ for t in targets], indent=2))
        return
    if not targets:
        out.print("nothing recorded: set `record: true` on a route or a pipeline step")
        return
    table = Table("target", "answers", "models", "first", "last")
    for t in targets:
        models = ", ".join(f"{m} {n}" for m, n in t.models.items())
        table.add_row(t.target, str(t.count), models, _when(t.first_at), _when(t.last_at))
    out.print(table)


@recordings_app.command("export")
def recordings_export(
    target: Annotated[str, typer.Argument(help="A route name or PIPELINE/STEP.")],
    output: Annotated[Path, typer.Option("--out", help="JSON Lines file to write.")],
    since: Annotated[
        str | None, typer.Option(help="Only answers since then: 24h, 7d, or a date.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only the answers of this model.")] = None,
    fleet_file: FleetOption = None,
    traces: TracesOption = None,
) -> None:
    """Write the recordings of TARGET as JSON Lines: `input` (the last user message) and
    `label` (the parsed answer, or its text), with the whole request and answer beside them."""
    store, _ = trace_store(fleet_file, traces)
    rows = store.recordings(target, since=parse_since(since) if since else None, model=model)
    store.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as handle:
        for row in rows:
            label = row.parsed if row.parsed is not None else row.answer
            handle.write(json.dumps({"input": row.input, "label": label, **row.as_json()}) + "\n")
    out.print(f"{len(rows)} recordings of {target} written to {output}")


@recordings_app.command("clear")
def recordings_clear(
    target: Annotated[str | None, typer.Argument(help="A target (default: every one).")] = None,
    before: Annotated[
        str | None, typer.Option(help="Only those older than this: 30d, or a date.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    fleet_file: FleetOption = None,
    traces: TracesOption = None,
) -> None:
    """Delete recorded requests and answers (they may hold what users typed)."""
    what = target or "every target"
    if not yes:
        typer.confirm(f"delete the recordings of {what}?", abort=True)
    store, _ = trace_store(fleet_file, traces)
    gone = store.forget_recordings(target, before=parse_since(before) if before else None)
    store.close()
    out.print(f"{gone} recordings of {what} deleted")
