"""`shoal run ...` and `shoal runs ...`: pipelines, and where each cent and second went."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.tree import Tree

from shoal.cli.common import FleetOption, err, fail, out
from shoal.engine import Engine
from shoal.errors import ShoalError
from shoal.fleet import Fleet
from shoal.messages import Usage
from shoal.pipeline.cache import ResponseCache
from shoal.pipeline.run import RunEvent, Runner, RunResult
from shoal.traces.store import CallRecord, RunRecord, TraceStore

run_app = typer.Typer(help="Run a pipeline.", no_args_is_help=True)
runs_app = typer.Typer(help="Recorded runs: list them, show where the money and time went.")


class _Progress:
    """One bar per step, filled as its items finish."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: RunEvent) -> None:
        if event.step is None:
            return
        if event.kind == "step_started":
            self.tasks[event.step] = self.progress.add_task(event.step, total=max(event.items, 1))
        elif event.kind == "item_done" and event.step in self.tasks:
            self.progress.advance(self.tasks[event.step])
        elif event.kind == "step_done" and event.step in self.tasks:
            task = self.tasks[event.step]
            self.progress.update(task, completed=max(event.items, 1))
            status = event.detail.get("status", "")
            notes = event.detail.get("degraded") or []
            if status != "ok" or notes:
                said = "; ".join([status] if status != "ok" and not notes else notes[:1])
                self.progress.update(task, description=f"{event.step} [yellow]({said})[/]")


@run_app.command("rental")
def run_rental(
    request: Annotated[str, typer.Argument(help="What the guest is looking for.")],
    city: Annotated[str, typer.Option(help="albany | jersey-city")] = "albany",
    budget: Annotated[float, typer.Option(min=0.0, help="USD this run may spend.")] = 0.01,
    deadline: Annotated[float, typer.Option(min=1.0, help="Seconds this run may take.")] = 60.0,
    all_large: Annotated[
        bool, typer.Option("--all-large", help="Every model step on the large model.")
    ] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not reuse answers.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    fleet_file: FleetOption = None,
) -> None:
    """The rental assistant on Inside Airbnb listings: criteria, shortlist, scores, answer."""
    from shoal_examples.rental import pipeline as rental

    try:
        engine = Engine(Fleet.from_file(fleet_file))
        rental.register_routes(engine)
        pipeline = rental.all_large() if all_large else rental.build()
    except ShoalError as exc:
        raise fail(exc) from None

    async def go() -> RunResult:
        cache = None if no_cache else ResponseCache(engine.fleet.cache_dir / "answers.sqlite")
        runner = Runner(engine, traces=engine.traces, cache=cache, concurrency=4)
        columns = (TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn())
        try:
            with Progress(*columns, TimeElapsedColumn(), console=err, transient=as_json) as bar:
                return await runner.run(
                    pipeline,
                    {"request": request, "city": city},
                    budget_usd=budget,
                    deadline_s=deadline,
                    on_event=_Progress(bar),
                )
        finally:
            if cache is not None:
                cache.close()
            await engine.aclose()

    try:
        result = asyncio.run(go())
    except ShoalError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json", exclude={"values"}), indent=2))
    else:
        _render_rental(result)
    if result.status == "failed":
        raise typer.Exit(1)


def _render_rental(result: RunResult) -> None:
    answer = result.output or {}
    criteria = answer.get("criteria") or result.values.get("criteria") or {}
    if criteria:
        wanted = ", ".join(f"{k}={v}" for k, v in criteria.items() if v not in (None, [], ""))
        out.print(f"[bold]criteria[/] {wanted}", highlight=False)
    table = Table("#", "listing", "$/night", "bedrooms", "km to downtown", "rating", "score", "why")
    for i, r in enumerate(answer.get("ranked") or [], start=1):
        table.add_row(
            str(i),
            r["title"],
            f"{r['price']:.0f}",
            str(r["bedrooms"]),
            f"{r['km_to_downtown']:.1f}",
            f"{r['rating']:.2f}" if r["rating"] else "-",
            f"{r['score']}/10",
            r["reason"],
        )
    if table.row_count:
        out.print(table)
    if answer.get("explanation"):
        out.print(answer["explanation"], highlight=False)
    if answer.get("note"):
        err.print(f"[dim]{answer['note']}[/]", highlight=False)
    colour = {"ok": "green", "partial": "yellow", "failed": "red"}[result.status]
    reason = f" — {result.stop_reason}" if result.stop_reason else ""
    err.print(
        f"[{colour}]{result.status}[/]{reason} · ${result.cost_usd:.6f} of "
        f"${result.budget_usd or 0:g} · {result.wall_s:.1f} s · run {result.run_id} "
        f"(shoal runs show {result.run_id})",
        highlight=False,
    )


# -- runs ---------------------------------------------------------------------------------------


def _store(fleet_file: Path | None, traces: Path | None) -> tuple[TraceStore, Fleet]:
    fleet = Fleet.from_file(fleet_file)
    path = traces or fleet.cache_dir / "traces.sqlite"
    if not path.is_file():
        raise fail(ShoalError(f"no trace store at {path}: nothing has run yet"))
    return TraceStore(path), fleet


TracesOption = Annotated[
    Path | None, typer.Option("--traces", help="Trace store (default: the fleet's cache).")
]


@runs_app.command("list")
def runs_list(
    limit: Annotated[int, typer.Option(min=1)] = 20,
    fleet_file: FleetOption = None,
    traces: TracesOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Recent runs: status, cost, budget, time."""
    store, _ = _store(fleet_file, traces)
    if as_json:
        runs = store.runs(limit=limit)
        store.close()
        typer.echo(json.dumps([_run_json(run) for run in runs], indent=2))
        return
    table = Table("pipeline", "status", "started", "cost", "budget", "wall")
    table.columns.insert(0, Column("run", no_wrap=True))
    for run in store.runs(limit=limit):
        wall = f"{run.finished_at - run.started_at:.1f} s" if run.finished_at else "-"
        table.add_row(
            run.id,
            run.name,
            run.status,
            datetime.fromtimestamp(run.started_at).strftime("%Y-%m-%d %H:%M:%S"),
            f"${run.cost_usd:.6f}",
            f"${run.budget_usd:g}" if run.budget_usd is not None else "-",
            wall,
        )
    out.print(table)
    store.close()


def _when(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()


def _run_json(run: RunRecord) -> dict[str, Any]:
    """A run for scripts: stable field names, money in USD, times in ISO 8601 (UTC)."""
    return {
        "id": run.id,
        "pipeline": run.name,
        "status": run.status,
        "stop_reason": run.detail.get("stop_reason"),
        "started_at": _when(run.started_at),
        "finished_at": _when(run.finished_at),
        "wall_s": None if run.finished_at is None else run.finished_at - run.started_at,
        "cost_usd": run.cost_usd,
        "budget_usd": run.budget_usd,
        "deadline_s": run.deadline_s,
    }


def _call_json(call: CallRecord) -> dict[str, Any]:
    return {
        "item": call.item,
        "model": call.model,
        "route": call.route,
        "status": call.status,
        "error": call.error,
        "cached": call.cached,
        "input_tokens": call.input_tokens,
        "output_tokens": call.output_tokens,
        "latency_s": call.latency_s,
        "compute_s": call.compute_s,
        "cost_usd": call.cost_usd,
    }


def large_model(fleet: Fleet) -> str:
    """The fleet model a typical call costs most on: the 'what if everything ran there'."""
    return max(fleet.ids, key=lambda m: fleet.card(m).seconds_for(500, 200))


def cost_on(fleet: Fleet, model: str, call: CallRecord) -> float:
    """What `call` would have cost on `model` (same tokens, that model's price and speed)."""
    card = fleet.card(model)
    if call.model == model:
        return call.cost_usd
    usage = Usage(input_tokens=call.input_tokens, output_tokens=call.output_tokens)
    return card.cost(usage, card.seconds_for(call.input_tokens, call.output_tokens))


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="A run id (see `shoal runs list`).")],
    fleet_file: FleetOption = None,
    traces: TracesOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a tree.")] = False,
) -> None:
    """The tree of steps with cost and latency, cost by model, and the same run on the large
    model."""
    store, fleet = _store(fleet_file, traces)
    run = store.run(run_id)
    if run is None:
        recent = ", ".join(r.id for r in store.runs(limit=5)) or "none"
        raise fail(ShoalError(f"no run {run_id!r}; recent runs: {recent}"))
    calls = store.calls(run_id)
    store.close()
    by_step: dict[str, list[CallRecord]] = defaultdict(list)
    for call in calls:
        by_step[call.step or "-"].append(call)
    steps: dict[str, Any] = run.detail.get("steps", {})
    models: dict[str, list[CallRecord]] = defaultdict(list)
    for call in calls:
        models[call.model].append(call)
    per_model = sorted(models.items(), key=lambda kv: -sum(c.cost_usd for c in kv[1]))
    total = sum(c.cost_usd for c in calls) or 1.0
    large = large_model(fleet)
    # Calls the cache answered cost nothing here and would have cost nothing there either.
    known = [c for c in calls if c.model in fleet.ids and not c.cached]
    actual = sum(c.cost_usd for c in known)
    counterfactual = sum(cost_on(fleet, large, c) for c in known)
    if as_json:
        step_rows = []
        for name in list(steps) or list(by_step):
            outcome = steps.get(name, {})
            mine = by_step.get(name, [])
            step_rows.append(
                {
                    "name": name,
                    "status": outcome.get("status"),
                    "wall_s": outcome.get("wall_s"),
                    "cost_usd": sum(c.cost_usd for c in mine),
                    "error": outcome.get("error"),
                    "degraded": outcome.get("degraded", []),
                    "calls": [_call_json(c) for c in mine],
                }
            )
        data = _run_json(run) | {
            "steps": step_rows,
            "models": [
                {
                    "model": model,
                    "calls": len(mine),
                    "input_tokens": sum(c.input_tokens for c in mine),
                    "output_tokens": sum(c.output_tokens for c in mine),
                    "compute_s": sum(c.compute_s for c in mine),
                    "cost_usd": sum(c.cost_usd for c in mine),
                    "share": sum(c.cost_usd for c in mine) / total,
                }
                for model, mine in per_model
            ],
            "on_large_model": {
                "model": large,
                "cost_usd": counterfactual,
                "paid_usd": actual,
                "ratio": actual / counterfactual if counterfactual else None,
            }
            if known
            else None,
        }
        typer.echo(json.dumps(data, indent=2))
        return
    wall = (run.finished_at or run.started_at) - run.started_at
    stop = run.detail.get("stop_reason")
    tree = Tree(
        f"[bold]{run.name}[/] {run.id} · {run.status}"
        + (f" ({stop})" if stop else "")
        + f" · ${run.cost_usd:.6f}"
        + (f" of ${run.budget_usd:g}" if run.budget_usd is not None else "")
        + f" · {wall:.1f} s wall"
    )
    for name in list(steps) or list(by_step):
        mine = by_step.get(name, [])
        outcome = steps.get(name, {})
        label = f"{name} · {outcome.get('status', '?')}"
        if outcome.get("wall_s"):
            label += f" · {outcome['wall_s']:.2f} s"
        if mine:
            label += f" · ${sum(c.cost_usd for c in mine):.6f} · {len(mine)} call(s)"
        branch = tree.add(label)
        for note in outcome.get("degraded", []):
            branch.add(f"[yellow]degraded: {note}[/]")
        if outcome.get("error"):
            branch.add(f"[red]{outcome['error']}[/]")
        for call in mine:
            flags = " [dim](cached)[/]" if call.cached else ""
            flags += f" [red]{call.status}[/]" if call.status != "ok" else ""
            via = f" via {call.route}" if call.route and call.route != call.model else ""
            # Compute is the model's work; the rest of the latency was spent waiting for it
            # (a local model computes one call at a time; a first call also waits for the load).
            waited = call.latency_s - call.compute_s
            timing = f"{call.compute_s:.2f} s" + (
                f" (+{waited:.2f} s waiting)" if waited >= 0.01 else ""
            )
            branch.add(
                f"{'item ' + call.item + ': ' if call.item else ''}{call.model}{via} · "
                f"{call.input_tokens}+{call.output_tokens} tok · {timing} · "
                f"${call.cost_usd:.6f}{flags}"
            )
    out.print(tree)
    table = Table("model", "calls", "tokens in+out", "compute s", "cost", "share")
    for model, mine in per_model:
        cost = sum(c.cost_usd for c in mine)
        table.add_row(
            model,
            str(len(mine)),
            f"{sum(c.input_tokens for c in mine)}+{sum(c.output_tokens for c in mine)}",
            f"{sum(c.compute_s for c in mine):.2f}",
            f"${cost:.6f}",
            f"{cost / total:.0%}",
        )
    out.print(table)
    if known:
        ratio = actual / counterfactual if counterfactual else 0.0
        out.print(
            f"The same calls on {large} would have cost ${counterfactual:.6f} "
            f"(estimated at its card's speed); this run paid ${actual:.6f}, {ratio:.0%} of it.",
            highlight=False,
        )
