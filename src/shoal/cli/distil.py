"""`shoal distil TARGET` and `shoal specialists ...` (registered by cli/main.py)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from shoal.cli.common import (
    FleetOption,
    TracesOption,
    err,
    fail,
    out,
    parse_since,
    trace_store,
    usd,
)
from shoal.cli.common import fleet_from as _fleet
from shoal.cli.common import guard as _guard
from shoal.errors import ConfigError, DistillationError, TargetNotReachedError

if TYPE_CHECKING:
    from shoal.fleet import Fleet
    from shoal.specialists.data import Data

specialists_app = typer.Typer(
    help="Specialists distilled from a large model's answers: list, show, eval, remove.",
    no_args_is_help=True,
)

KindOption = Annotated[
    str, typer.Option("--kind", help="classifier (closed-set answers) | reuse (recorded answers).")
]


# -- data ----------------------------------------------------------------------------------------


def _outcome_table(path: Path, teacher: str | None) -> Data:
    """Examples from an outcome table: the teacher's `answer` per query, and gold where its
    `score` tells it (right: its answer; wrong, with two labels: the other one)."""
    from collections import Counter

    from shoal.routing.outcomes import read_rows
    from shoal.specialists.data import Data
    from shoal.specialists.forms import label_key
    from shoal.specialists.train import Example

    rows = read_rows(path)
    models = Counter(r.model for r in rows)
    if teacher is None:
        if len(models) != 1:
            raise DistillationError(
                f"{path} holds the answers of {', '.join(sorted(models))}; say which is the "
                "teacher with --teacher"
            )
        teacher = next(iter(models))
    mine = [r for r in rows if r.model == teacher]
    if not mine:
        raise DistillationError(f"{path} has no answer of {teacher!r}; it has: {', '.join(models)}")
    if not any(r.answer for r in mine):
        raise DistillationError(
            f"{path} has no `answer` column for {teacher}: a specialist learns the teacher's "
            "answers (shoal outcomes build records them)"
        )
    labels = sorted({label_key(r.answer) for r in mine if r.answer})

    def gold(answer: str, score: float) -> str | None:
        key = label_key(answer)
        if not key:
            return None
        if score >= 1.0:
            return key
        others = [k for k in labels if k != key]
        return others[0] if score <= 0.0 and len(labels) == 2 else None

    examples = [
        Example(r.prompt, r.answer, gold=gold(r.answer, r.score), teacher_cost_usd=r.cost_usd)
        for r in mine
    ]
    return Data(examples, [teacher] * len(examples), None, source=str(path))


def _load(
    target: str,
    fleet_file: Path | None,
    data: Path | None,
    from_traces: bool,
    since: str | None,
    traces: Path | None,
    teacher: str | None,
    schema: Path | None,
) -> tuple[str | None, Data]:
    from shoal.specialists import data as sources

    if (data is None) == (not from_traces):
        raise ConfigError(
            "give one source: --data FILE (JSON Lines or an outcome table) or --from-traces"
        )
    if from_traces:
        store, _ = trace_store(fleet_file, traces)
        try:
            recorded = store.recordings(target, since=parse_since(since) if since else None)
        finally:
            store.close()
        return sources.from_recordings(target, recorded).teacher(teacher)
    assert data is not None
    if data.name.endswith((".csv", ".csv.gz")):
        loaded = _outcome_table(data, teacher)
        return loaded.models[0], loaded
    given = None
    if schema is not None:
        try:
            given = json.loads(schema.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise DistillationError(f"cannot read the JSON schema {schema}: {exc}") from None
    return sources.read_jsonl(data, schema=given).teacher(teacher)


def _default_teacher(fleet: Fleet, target: str) -> str | None:
    """TARGET's own model: a model id, or a fixed route's model."""
    from shoal.settings import FixedRouteSpec

    if target in fleet.ids:
        return target
    for route in fleet.settings.routes:
        if route.name == target and isinstance(route, FixedRouteSpec):
            return route.model
    return None


def _teacher_cost(fleet: Fleet, teacher: str, data: Data) -> float | None:
    """The teacher's cost per call from its card, when the data does not say what it cost."""
    from shoal.messages import ChatRequest

    card = fleet.card(teacher)
    tokens = 256 if data.schema is not None else 8
    sample = data.examples[:50]
    costs = [card.expected_cost(ChatRequest.of(e.input or " ", max_tokens=tokens)) for e in sample]
    return sum(costs) / len(costs) if costs else None


# -- report --------------------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1%}"


def _print_report(name: str, kind: str, teacher: str, report: dict[str, Any]) -> None:
    held, costs = report["heldout"], report["costs"]
    unparsed = report["unparsed"]
    out.print(
        f"specialist [bold]{name}[/] ({kind}, {report['form']}) from {report['examples']} "
        f"answers of {teacher}" + (f" ({unparsed} did not parse: left out)" if unparsed else ""),
        highlight=False,
    )
    seconds = report["seconds"]
    out.print(
        f"  trained on {report['train']}, checked on {report['heldout_examples']} held out, "
        f"in {seconds['total']:.1f} s (embedding {seconds['embedding']:.1f} s, fitting "
        f"{seconds['fitting']:.1f} s)",
        highlight=False,
    )
    threshold = report["threshold"]
    shown = "none" if threshold is None else f"{threshold:.3f}"
    out.print(f"  target: {report['target']} · threshold {shown}", highlight=False)
    line = (
        f"  held out: coverage {_pct(held['coverage'])} · route agreement "
        f"{_pct(held.get('route_agreement'))} (its own answers: "
        f"{_pct(held.get('agreement_answered'))})"
    )
    if held.get("gold_known"):
        line += (
            f" · accuracy on gold: route {_pct(held.get('route_accuracy'))}, teacher "
            f"{_pct(held.get('teacher_accuracy'))}, its own answers "
            f"{_pct(held.get('accuracy_answered'))}"
        )
    out.print(line, highlight=False)
    teacher_cost = costs.get("teacher_usd_per_call")
    if teacher_cost:
        how = "measured" if costs["teacher_cost_known"] else "estimated from its card"
        out.print(
            f"  cost per call: {usd(costs['specialist_usd_per_call'])} "
            f"({costs['seconds_per_call'] * 1000:.1f} ms) against the teacher's "
            f"{usd(teacher_cost)} ({how}): {_pct(costs['cost_ratio'])}; the route costs "
            f"{_pct(costs['route_cost_ratio'])} of always asking the teacher",
            highlight=False,
        )


# -- distil --------------------------------------------------------------------------------------


def distil(
    target: Annotated[
        str, typer.Argument(help="A route name, a model id, or PIPELINE/STEP (names the result).")
    ],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="JSON Lines (input, label[, gold]) or an outcome table."),
    ] = None,
    from_traces: Annotated[
        bool, typer.Option("--from-traces", help="Train on what TARGET recorded.")
    ] = False,
    since: Annotated[
        str | None, typer.Option(help="With --from-traces: only since then (24h, 7d, a date).")
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="The model whose answers it learns (and escalates to).")
    ] = None,
    kind: KindOption = "classifier",
    quality: Annotated[
        str,
        typer.Option(
            "--target", help="agreement=0.95 | quality_ratio=0.95 | min_accuracy=0.8 (gold)."
        ),
    ] = "agreement=0.95",
    head: Annotated[str, typer.Option(help="A classifier's head: logistic | mlp.")] = "logistic",
    labels: Annotated[
        str | None, typer.Option(help="The closed set of labels, comma-separated.")
    ] = None,
    schema: Annotated[
        Path | None, typer.Option(help="The JSON schema of JSON labels in --data.")
    ] = None,
    holdout: Annotated[float, typer.Option(help="Share held out to check it.")] = 0.3,
    seed: Annotated[int, typer.Option(help="Which split.")] = 0,
    name: Annotated[str | None, typer.Option(help="The specialist's model id.")] = None,
    route: Annotated[str | None, typer.Option(help="The name of its route.")] = None,
    output: Annotated[
        Path | None, typer.Option("--out", help="Its file (default: in the cache folder).")
    ] = None,
    install: Annotated[
        bool, typer.Option(help="Write it and its route into the fleet file.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    traces: TracesOption = None,
    fleet_file: FleetOption = None,
) -> None:
    """Train a specialist on TARGET's teacher answers, calibrate it to the target, check it on
    held-out data, and (with --install, the default) write it and a route using it into the
    fleet file. Nothing is installed when held-out data misses the target."""
    from shoal.specialists.calibrate import Target
    from shoal.specialists.manage import SHORT, slug
    from shoal.specialists.manage import install as install_it
    from shoal.specialists.train import distil as train

    if kind not in SHORT:
        raise fail(ConfigError(f"unknown --kind {kind!r}; valid: {', '.join(SHORT)}"))
    if head not in ("logistic", "mlp"):
        raise fail(ConfigError(f"unknown --head {head!r}; valid: logistic, mlp"))
    if install and fleet_file is None:
        raise fail(
            ConfigError(
                "name the fleet file to write the specialist into with --fleet (it is created "
                "when missing), or pass --no-install"
            )
        )
    fleet = _fleet(fleet_file if fleet_file is not None and fleet_file.exists() else None)
    goal = _guard(partial(Target.parse, quality))
    found, loaded = _guard(
        lambda: _load(target, fleet_file, data, from_traces, since, traces, teacher, schema)
    )
    teacher = found or teacher or _default_teacher(fleet, target)
    if teacher is None:
        raise fail(ConfigError("say which model is the teacher with --teacher"))
    _guard(partial(fleet.card, teacher))
    form = _guard(partial(loaded.form, kind))  # type: ignore[arg-type]
    model_id = name or f"{slug(target)}-{SHORT[kind]}"
    route_name = route or f"{slug(target)}-specialist"
    try:
        distilled = train(
            loaded.examples,
            form,
            fleet.embedder(),
            kind=kind,  # type: ignore[arg-type]
            target=goal,
            head=head,  # type: ignore[arg-type]
            labels=[s.strip() for s in labels.split(",")] if labels else None,
            holdout=holdout,
            seed=seed,
            teacher_cost_usd=_teacher_cost(fleet, teacher, loaded),
            host_price_per_hour=fleet.settings.host_price_per_hour,
        )
    except TargetNotReachedError as exc:
        if as_json:
            typer.echo(json.dumps({"installed": False, "report": exc.report}, indent=2))
        else:
            _print_report(model_id, kind, teacher, exc.report)
        raise fail(exc) from None
    except DistillationError as exc:
        raise fail(exc) from None
    report = distilled.report
    done: list[str] = []
    if install:
        assert fleet_file is not None
        path = output or fleet.cache_dir / "specialists" / f"{model_id}.npz"
        done = _guard(
            lambda: install_it(
                fleet_file,
                fleet.settings,
                fleet.ids,
                distilled,
                model_id=model_id,
                route=route_name,
                target=target,
                teacher=teacher,
                path=path.expanduser().resolve(),
                embedder=fleet.embedder().identity,
            )
        )
    if as_json:
        typer.echo(json.dumps({"installed": install, "report": report, "done": done}, indent=2))
        return
    _print_report(model_id, kind, teacher, report)
    for line in done:
        out.print(line, highlight=False)
    if install:
        where = "point the step's `model` at it" if "/" in target else "call it by that name"
        out.print(f"its route is {route_name}: {where}", highlight=False)


# -- specialists ---------------------------------------------------------------------------------


@specialists_app.command("list")
def specialists_list(
    fleet_file: FleetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every specialist of the fleet: kind, teacher, coverage, cost, and whether it serves."""
    from shoal.specialists.manage import specialists_in, status
    from shoal.specialists.model import Specialist

    fleet = _fleet(fleet_file)
    rows = []
    for spec in specialists_in(fleet.settings):
        model = fleet.model(spec.id)
        assert isinstance(model, Specialist)
        rows.append(status(spec, fleet.settings.routes, model))
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        out.print("no specialists in this fleet: make one with `shoal distil`")
        return
    table = Table("id", "kind", "teacher", "coverage", "cost", "routes", "state")
    for row in rows:
        held = row.get("report", {}).get("heldout", {})
        ratio = row.get("report", {}).get("costs", {}).get("route_cost_ratio")
        state = row["state"] if row["state"] == "ok" else f"[red]{row['state']}[/]"
        table.add_row(
            row["id"],
            row.get("kind", "-"),
            row["teacher"] or "-",
            _pct(held.get("coverage")),
            _pct(ratio),
            ", ".join(row["routes"]) or "-",
            state,
        )
    out.print(table)
    for row in rows:
        if row["state"] != "ok":
            err.print(f"{row['id']}: {row['why']}", highlight=False)


@specialists_app.command("show")
def specialists_show(
    name: Annotated[str, typer.Argument(help="The specialist's model id.")],
    fleet_file: FleetOption = None,
) -> None:
    """A specialist's file, calibration, training report and state, as JSON."""
    from shoal.specialists.manage import spec_of, status
    from shoal.specialists.model import Specialist

    fleet = _fleet(fleet_file)
    spec = _guard(partial(spec_of, fleet.settings, name))
    model = fleet.model(name)
    assert isinstance(model, Specialist)
    row = status(spec, fleet.settings.routes, model)
    row["card"] = fleet.card(name).model_dump(mode="json")
    typer.echo(json.dumps(row, indent=2, default=str))


@specialists_app.command("eval")
def specialists_eval(
    name: Annotated[str, typer.Argument(help="The specialist's model id.")],
    data: Annotated[
        Path | None, typer.Option("--data", help="JSON Lines or an outcome table.")
    ] = None,
    from_traces: Annotated[
        bool, typer.Option("--from-traces", help="What its target recorded (newer traffic).")
    ] = False,
    since: Annotated[str | None, typer.Option(help="With --from-traces: since then.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Whose answers to compare with.")] = None,
    traces: TracesOption = None,
    fleet_file: FleetOption = None,
) -> None:
    """How the installed specialist does at its threshold on other data: coverage, agreement
    with the teacher, accuracy on gold where known."""
    from shoal.specialists.manage import evaluate, spec_of
    from shoal.specialists.model import Specialist

    fleet = _fleet(fleet_file)
    spec = _guard(partial(spec_of, fleet.settings, name))
    model = fleet.model(name)
    assert isinstance(model, Specialist)
    trained = _guard(model.trained)
    target = str(trained.meta.get("target"))
    _, loaded = _guard(
        lambda: _load(
            target, fleet_file, data, from_traces, since, traces, teacher or spec.teacher, None
        )
    )
    result = _guard(lambda: evaluate(model, loaded.examples))
    typer.echo(json.dumps(result, indent=2))


@specialists_app.command("remove")
def specialists_remove(
    name: Annotated[str, typer.Argument(help="The specialist's model id.")],
    fleet_file: FleetOption = None,
) -> None:
    """Take a specialist and its routes out of the fleet file, and delete its file."""
    from shoal.specialists.manage import remove

    if fleet_file is None:
        raise fail(ConfigError("name the fleet file the specialist is in with --fleet"))
    fleet = _fleet(fleet_file)
    for line in _guard(lambda: remove(fleet_file, fleet.settings, name)):
        out.print(line, highlight=False)
