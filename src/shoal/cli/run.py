"""`shoal run ...` and `shoal runs ...`: pipelines, and where each cent and second went."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import EntryPoint, entry_points
from typing import Annotated, Any

import typer
import typer.main
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.tree import Tree
from typer._click.core import Command, Context  # the click that typer's groups are written in
from typer.core import TyperGroup

from shoal.cli.common import FleetOption, TracesOption, err, fail, out, trace_store
from shoal.engine import Engine
from shoal.errors import ConfigError, PipelineError, ShoalError
from shoal.fleet import Fleet
from shoal.messages import Usage
from shoal.pipeline import registry
from shoal.pipeline.cache import ResponseCache
from shoal.pipeline.graph import Pipeline
from shoal.pipeline.run import RunEvent, Runner, RunResult
from shoal.traces.store import CallRecord, RunRecord


class _RunGroup(TyperGroup):
    """`shoal run NAME ...`: the pipeline NAME (a YAML file or a registered name) run with
    `--input key=value`, unless an app registered a command of that name (entry-point group
    `shoal.run_commands`) and no `--input` is given."""

    def list_commands(self, ctx: Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | {ep.name for ep in _run_commands()})

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        for ep in _run_commands():
            if ep.name == cmd_name:
                return _app_command(ep)
        return None

    def resolve_command(
        self, ctx: Context, args: list[str]
    ) -> tuple[str | None, Command | None, list[str]]:
        if args and not args[0].startswith("-") and args[0] != PIPELINE:
            given = any(a == "--input" or a.startswith("--input=") for a in args)
            if given or self.get_command(ctx, args[0]) is None:
                return PIPELINE, super().get_command(ctx, PIPELINE), args
        return super().resolve_command(ctx, args)


RUN_COMMANDS = "shoal.run_commands"
PIPELINE = "pipeline"


def _run_commands() -> list[EntryPoint]:
    return list(entry_points(group=RUN_COMMANDS))


def _app_command(ep: EntryPoint) -> Command:
    """The command an app registered under `shoal run` (a function typer can turn into one)."""
    try:
        function = ep.load()
    except Exception as exc:  # an app's import may fail in any way
        problem = PipelineError(
            f"cannot load the command `shoal run {ep.name}` (entry point {ep.value!r} in group "
            f"{RUN_COMMANDS!r}): {type(exc).__name__}: {exc}"
        )
        raise fail(problem) from None
    single = typer.Typer()
    single.command(ep.name)(function)
    return typer.main.get_command(single)


run_app = typer.Typer(
    cls=_RunGroup,
    help="Run a pipeline: `shoal run FILE.yaml --input key=value ...`, `shoal run NAME --input "
    "key=value ...` (see `shoal pipelines list`), or a command an app registered (`shoal run "
    "rental`).",
    no_args_is_help=True,
)
runs_app = typer.Typer(help="Recorded runs: list them, show where the money and time went.")
pipelines_app = typer.Typer(help="The pipelines apps have registered.", no_args_is_help=True)


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


def run_pipeline(
    engine: Engine,
    pipeline: Pipeline,
    inputs: dict[str, Any],
    *,
    budget_usd: float | None,
    deadline_s: float | None,
    use_cache: bool = True,
    as_json: bool = False,
    render: Callable[[RunResult], None] | None = None,
) -> None:
    """Run `pipeline` on `engine` with progress bars, print the result (JSON with `as_json`,
    else `render`'s way, by default the output), close the engine; exit 1 if the run failed.
    For commands apps register under `shoal run`."""

    async def go() -> RunResult:
        cache = ResponseCache(engine.fleet.cache_dir / "answers.sqlite") if use_cache else None
        runner = Runner(engine, traces=engine.traces, cache=cache, concurrency=4)
        columns = (TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn())
        try:
            with Progress(*columns, TimeElapsedColumn(), console=err, transient=as_json) as bar:
                return await runner.run(
                    pipeline,
                    inputs,
                    budget_usd=budget_usd,
                    deadline_s=deadline_s,
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
        # A run that did not end ok keeps its sub-results (the steps' values) in the JSON too.
        hidden = {"values"} if result.status == "ok" else set()
        typer.echo(json.dumps(result.model_dump(mode="json", exclude=hidden), indent=2))
    else:
        (render or _render_output)(result)
        print_status(result)
    if result.status == "failed":
        raise typer.Exit(1)


def _render_output(result: RunResult) -> None:
    """The output. A run that did not end ok shows every sub-result that is complete (each step
    that finished, by name, in order), the output if it has one, and what was cut and why."""
    if result.status == "ok":
        _print_value(result.output)
        return
    done = [n for n, step in result.steps.items() if step.status == "ok" and n in result.values]
    for name in done:
        out.print(f"[bold]{name}[/] (complete):", highlight=False)
        _print_value(result.values[name])
    if result.output is not None and all(result.values[n] != result.output for n in done):
        out.print("[bold]output[/] (with gaps):", highlight=False)
        _print_value(result.output)
    if not done and result.output is None:
        out.print("[yellow]no step finished[/]", highlight=False)
    print_cuts(result)


def _print_value(value: Any) -> None:
    if isinstance(value, str):
        out.print(value, markup=False, highlight=False)
    elif value is not None:
        typer.echo(json.dumps(value, indent=2))


def print_cuts(result: RunResult) -> None:
    """Each step that did not finish, or finished with gaps, and why, on standard error."""
    for name, step in result.steps.items():
        if step.status == "ok":
            continue
        why = step.error or "; ".join(step.degraded) or "not started"
        if step.status == "partial" and step.items_failed:
            why = f"{step.items_failed} of {step.items} item(s) failed; the last: {why}"
        elif step.skipped_for_time:
            why = "; ".join(step.degraded) or "skipped: too little time left"
        err.print(f"[yellow]cut: {name} ({why})[/]", highlight=False)


def print_status(result: RunResult) -> None:
    """The run's status, cost against its budget, time and id, on standard error."""
    colour = {"ok": "green", "partial": "yellow", "failed": "red"}[result.status]
    reason = f" — {result.stop_reason}" if result.stop_reason else ""
    budget = f" of ${result.budget_usd:g}" if result.budget_usd is not None else ""
    err.print(
        f"[{colour}]{result.status}[/]{reason} · ${result.cost_usd:.6f}{budget} · "
        f"{result.wall_s:.1f} s · run {result.run_id} (shoal runs show {result.run_id})",
        highlight=False,
    )


def _parse_inputs(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value is JSON where it parses as JSON, else the string itself."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--input {pair!r}: write it as key=value")
        try:
            inputs[key] = json.loads(text)
        except json.JSONDecodeError:
            inputs[key] = text
    return inputs


@run_app.command(PIPELINE, hidden=True)
def run_any(
    target: Annotated[
        str, typer.Argument(help="A pipeline YAML file, or a registered pipeline's name.")
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="An input, key=value (the value as JSON if it is)."),
    ] = None,
    budget: Annotated[
        float | None, typer.Option(min=0.0, help="USD this run may spend (default: no limit).")
    ] = None,
    deadline: Annotated[
        float | None, typer.Option(min=0.0, help="Seconds this run may take (default: none).")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not reuse answers.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    fleet_file: FleetOption = None,
) -> None:
    """Any pipeline: a YAML file or a registered name, its inputs given with --input."""
    try:
        values = _parse_inputs(inputs or [])
        engine = Engine(Fleet.from_file(fleet_file))
    except ShoalError as exc:
        raise fail(exc) from None
    try:
        pipeline = registry.load(target, engine)
    except ShoalError as exc:
        asyncio.run(engine.aclose())
        raise fail(exc) from None
    run_pipeline(
        engine,
        pipeline,
        values,
        budget_usd=budget,
        deadline_s=deadline,
        use_cache=not no_cache,
        as_json=as_json,
    )


@pipelines_app.command("list")
def pipelines_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The registered pipelines (entry-point group `shoal.pipelines`): name and source."""
    found = registry.registered()
    if as_json:
        data = [{"name": p.name, "source": p.source, "kind": "entry point"} for p in found]
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table("name", "source")
    for p in found:
        table.add_row(p.name, f"entry point {p.source}")
    out.print(table)


# -- runs ---------------------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(
    limit: Annotated[int, typer.Option(min=1)] = 20,
    fleet_file: FleetOption = None,
    traces: TracesOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Recent runs: status, cost, budget, time."""
    store, _ = trace_store(fleet_file, traces)
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
    store, fleet = trace_store(fleet_file, traces)
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
