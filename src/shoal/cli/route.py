"""`shoal route ...` and `shoal outcomes ...`: routing commands (registered by cli/main.py)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shoal.cli.common import FleetOption, err, out
from shoal.cli.common import fleet_from as _fleet
from shoal.cli.common import guard as _guard
from shoal.cli.common import run_coroutine as _run

if TYPE_CHECKING:
    from shoal.fleet import Fleet
    from shoal.routing.evaluate import Curve
    from shoal.routing.outcomes import OutcomeTable
    from shoal.settings import RouteSpec

route_app = typer.Typer(help="Named routes: calibrate, evaluate, explain.", no_args_is_help=True)
outcomes_app = typer.Typer(help="Outcome tables: per-query quality and cost.", no_args_is_help=True)


# -- outcomes ------------------------------------------------------------------------------------


@outcomes_app.command("build")
def outcomes_build(
    dataset: Annotated[
        list[str], typer.Option("--dataset", help="mmlu | arc | boolq | sst2 | gsm8k (repeat).")
    ],
    n: Annotated[
        list[int], typer.Option("--n", min=1, help="Questions per data set (one, or one each).")
    ],
    output: Annotated[
        Path | None, typer.Option("--out", help="Table file (default: in the cache dir).")
    ] = None,
    model_ids: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Models (default: every local one).")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="llama.cpp threads per model.")] = None,
    seed: Annotated[int, typer.Option(help="Which sample of each data set.")] = 0,
    fleet_file: FleetOption = None,
) -> None:
    """Run the fleet on gold-answer questions and record each answer's correctness and cost.

    Resumable: answers already in the table are skipped.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from shoal.errors import ConfigError
    from shoal.models.base import Model
    from shoal.routing import datasets
    from shoal.routing.build import build_outcomes

    fleet = _fleet(fleet_file)
    if len(n) not in (1, len(dataset)):
        _guard(lambda: _fail(ConfigError("give one --n, or one --n per --dataset")))
    sizes = n * len(dataset) if len(n) == 1 else n
    parts = [
        _guard(partial(datasets.load, name, size, seed=seed))
        for name, size in zip(dataset, sizes, strict=True)
    ]
    # Interleaved in blocks: a table cut short still mixes every data set, and each model sees
    # runs of questions that share a system prompt and example, which llama.cpp keeps cached.
    block = 10
    items = [
        item
        for start in range(0, max(map(len, parts)), block)
        for part in parts
        for item in part[start : start + block]
    ]
    ids = model_ids or [c.id for c in fleet.cards() if c.runs == "local" and fleet.installed(c.id)]
    path = output or fleet.cache_dir / "outcomes" / "local.csv"

    def model(model_id: str) -> Model:
        if threads is None:
            return fleet.model(model_id)
        from shoal.models.llamacpp import LlamaCppModel

        return LlamaCppModel(fleet.card(model_id), path=fleet.gguf_path(model_id), threads=threads)

    models = [_guard(partial(model, i)) for i in ids]

    async def go() -> int:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
        ) as bar:
            task = bar.add_task("answering", total=len(items) * len(models))

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=what)

            try:
                return await build_outcomes(models, items, path, progress=progress)
            finally:
                for m in models:
                    await m.aclose()
                await fleet.aclose()

    added = _run(go())
    out.print(f"{added} answers added to {path}")


def _fail(exc: Exception) -> None:
    raise exc


@outcomes_app.command("show")
def outcomes_show(
    table_file: Annotated[Path, typer.Argument(help="An outcome table (CSV).")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Each model's mean score and cost on a table, per group."""
    from shoal.routing.outcomes import read_table

    table = _guard(lambda: read_table(table_file))
    summary = {
        "queries": len(table),
        "models": {
            m: {"score": table.mean_scores()[m], "cost_usd": table.mean_costs()[m]}
            for m in table.models
        },
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.table import Table

    view = Table("model", "mean score", "mean cost $", title=f"{len(table)} queries")
    for m, v in summary["models"].items():  # type: ignore[attr-defined]
        view.add_row(m, f"{v['score']:.3f}", f"{v['cost_usd']:.3g}")
    out.print(view)


# -- routes --------------------------------------------------------------------------------------

OutcomesOption = Annotated[
    str | None,
    typer.Option(
        "--outcomes",
        help="Outcome table: a CSV path, or routellm:mmlu, routerbench:TASK, routerdc:TASK.",
    ),
]


def _load_table(source: str) -> OutcomeTable:
    from shoal.routing import importers
    from shoal.routing.outcomes import read_table

    kind, _, task = source.partition(":")
    if kind == "routellm" and task in ("", "mmlu"):
        return importers.routellm_mmlu()
    if kind == "routerbench" and task:
        return importers.routerbench(task)
    if kind == "routerdc" and task:
        return importers.routerdc(task)
    return read_table(Path(source))


def _spec(fleet: Fleet, name: str) -> RouteSpec:
    from shoal.errors import UnknownRouteError

    for spec in fleet.settings.routes:
        if spec.name == name:
            return spec
    raise UnknownRouteError(name, [s.name for s in fleet.settings.routes])


@route_app.command("list")
def route_list(fleet_file: FleetOption = None) -> None:
    """The routes of the fleet file, with their kind and models."""

    fleet = _fleet(fleet_file)
    if not fleet.settings.routes:
        out.print("no routes configured (add a `routes:` section to the fleet file)")
        return
    for spec in fleet.settings.routes:
        models = getattr(spec, "models", None) or [getattr(spec, "model", "")]
        out.print(f"{spec.name}: {spec.kind} over {', '.join(models)}")


@route_app.command("calibrate")
def route_calibrate(
    name: Annotated[str, typer.Argument(help="A predictive route of the fleet file.")],
    outcomes: Annotated[
        Path | None, typer.Option("--outcomes", help="Table to fit on (default: the route's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="The train/test split, when the table has none.")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    fleet_file: FleetOption = None,
) -> None:
    """Fit a route to its target on the table's train split; report it on the test split."""
    from shoal.errors import ConfigError
    from shoal.routing.config import calibrate_route
    from shoal.settings import PredictiveRouteSpec

    fleet = _fleet(fleet_file)
    spec = _guard(partial(_spec, fleet, name))
    if not isinstance(spec, PredictiveRouteSpec):
        problem = ConfigError(f"route {name!r} is a {spec.kind} route: only predictive routes fit")
        _guard(partial(_fail, problem))
        return
    cal = _guard(partial(calibrate_route, spec, fleet, outcomes=outcomes, seed=seed))
    summary = cal.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=float))
        return
    held = cal.heldout
    out.print(f"route [bold]{name}[/]: target {summary['target']}")
    out.print(
        f"  calibration ({summary['train_queries']} queries): cost weight {cal.setting:.4g}, "
        f"quality {cal.calib_quality:.3f} "
        f"(95% CI {cal.calib_quality_ci[0]:.3f}-{cal.calib_quality_ci[1]:.3f}), "
        f"cost {cal.calib_cost_ratio:.0%} of the best model's, "
        + ("target met" if cal.met else "[red]target NOT met: routes to the best predicted[/]")
    )
    if held is not None:
        out.print(
            f"  held out ({summary['test_queries']} queries): quality {held.quality:.3f} "
            f"(95% CI {held.quality_ci[0]:.3f}-{held.quality_ci[1]:.3f}) = "
            f"{held.quality_ratio:.1%} of the best model's, cost {held.cost_ratio:.1%} of its "
            f"cost, {held.best_share:.0%} of calls to it; "
            + ("target met" if held.met else "[red]target NOT met on held-out data[/]")
        )


@route_app.command("eval")
def route_eval(
    outcomes: OutcomesOption = None,
    route: Annotated[
        str, typer.Option("--route", help="A route of the fleet file, or a predictor kind.")
    ] = "ensemble",
    png: Annotated[
        Path | None, typer.Option(help="Cost-quality plot (default: next to it).")
    ] = None,
    seed: Annotated[int, typer.Option(help="The train/test split, when the table has none.")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    fleet_file: FleetOption = None,
) -> None:
    """APGR, CPT(50/80%), cost at 95% of the best model, AIQ: the route against random,
    always-cheapest, best single model, zero router and oracle, on the held-out split."""
    from shoal.errors import ConfigError
    from shoal.routing import evaluate as ev

    fleet = _fleet(fleet_file)
    if outcomes is None:
        _guard(partial(_fail, ConfigError("give --outcomes (a table path or an importer name)")))
        return
    table = _guard(partial(_load_table, outcomes))
    result = _guard(partial(_evaluate_route, fleet, table, route, seed))
    curves, summary, calibrated = result
    path = png or Path(f"route-eval-{route}.png")
    marks = [("calibrated", c, q) for c, q in calibrated]
    test = summary.pop("_test")
    ev.plot(test, curves, path, title=f"{table.name}: route {route} (held-out split)", marks=marks)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=float))
        return
    out.print(f"{table.name}: {summary['queries']} held-out queries; best model {summary['best']}")
    out.print(ev.format_table(summary), markup=False, highlight=False)
    out.print("(costs are fractions of the best model's; CPT = share of calls to it)")
    out.print(f"plot: {path}")


def _evaluate_route(
    fleet: Fleet, table: OutcomeTable, route: str, seed: int
) -> tuple[list[Curve], dict[str, Any], list[tuple[float, float]]]:
    from shoal.errors import UnknownRouteError
    from shoal.routing import evaluate as ev
    from shoal.routing.calibrate import Target, calibrate_cascade, calibrate_predictive
    from shoal.routing.predictive import minilm_featurizer
    from shoal.settings import CascadeRouteSpec, PredictiveRouteSpec

    kinds = ("knn", "logistic", "mlp", "mf", "ensemble")
    configured = [s.name for s in fleet.settings.routes]
    if route not in kinds and route not in configured:
        raise UnknownRouteError(route, [*configured, *kinds])
    spec = None if route in kinds else _spec(fleet, route)
    if spec is not None and hasattr(spec, "models"):
        table = table.select_models(list(spec.models))
    table.check_routable()
    if {"train", "test"} <= set(table.splits):
        train, test = table.split("train"), table.split("test")
    else:
        train, test = table.random_split(0.5, seed=seed)
    ref = ev.Reference.of(test)
    curves: list[Curve] = []
    marks: list[tuple[float, float]] = []
    if isinstance(spec, CascadeRouteSpec):
        order = [table.models.index(m) for m in spec.models]
        curves.append(ev.cascade_curve(test, order, f"{route} (cascade)"))
        cal = calibrate_cascade(train, order, Target(quality_ratio=0.95), test=test)
    else:
        kind = spec.predictor if isinstance(spec, PredictiveRouteSpec) else route
        target = (
            Target.model_validate(spec.target.model_dump())
            if isinstance(spec, PredictiveRouteSpec)
            else Target(quality_ratio=0.95)
        )
        feat = minilm_featurizer(fleet.cache_dir)
        fit = calibrate_predictive(
            train, feat(train.prompts), target, kind=kind, test=test, x_test=feat(test.prompts)
        )
        cal = fit.calibration
        assert cal.test_curve is not None
        cal.test_curve.label = route
        curves.append(cal.test_curve)
    if cal.heldout is not None:
        marks.append((cal.heldout.cost / ref.c_best, cal.heldout.quality))
    summary = ev.evaluate(test, curves)
    summary["calibrated"] = cal.summary()
    summary["_test"] = test
    return curves, summary, marks


@route_app.command("explain")
def route_explain(
    prompt: Annotated[str, typer.Argument(help="The request to route.")],
    route: Annotated[str, typer.Option("--route", "-r", help="A route of the fleet file.")],
    answer: Annotated[bool, typer.Option(help="Also call the chosen model(s).")] = False,
    max_tokens: Annotated[int, typer.Option(min=1)] = 256,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    fleet_file: FleetOption = None,
) -> None:
    """Each candidate's predicted quality, cost and latency, and why the route chose."""
    from rich.table import Column, Table

    from shoal.engine import Engine
    from shoal.messages import ChatRequest
    from shoal.routing.base import RoutedModel

    fleet = _fleet(fleet_file)
    engine = _guard(partial(Engine, fleet))
    routed = _guard(partial(engine.route, route))
    assert isinstance(routed, RoutedModel)
    request = ChatRequest.of(prompt, max_tokens=max_tokens)
    # The first decision loads the route (the embedder, for a predictive one).
    first = _guard(partial(routed.decide, ChatRequest.of("Hello!", max_tokens=max_tokens)))
    decision = _guard(partial(routed.decide, request))
    response = None
    if answer:

        async def go() -> Any:
            try:
                return await engine.generate(route, request)
            finally:
                await engine.aclose()

        response = _run(go())
    if as_json:
        data = decision.model_dump(mode="json")
        if response is not None:
            data["answer"] = {
                "model": response.model,
                "text": response.text,
                "cost_usd": response.total_cost_usd,
                "attempts": [a.model for a in response.attempts],
            }
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(
        Column("candidate", no_wrap=True),
        Column("quality", justify="right"),
        Column("cost $", justify="right"),
        Column("p95 s", justify="right"),
        "eligible",
        "note",
        title=f"route {route}: {prompt[:60]!r}",
        caption="quality: predicted chance of a good answer; cost: expected per call; "
        "p95 s: measured latency",
    )
    chosen = set(decision.models)
    for e in decision.estimates:
        name = f"[bold green]{e.model}[/]" if e.model in chosen else e.model
        table.add_row(
            name,
            "-" if e.quality is None else f"{e.quality:.2f}",
            "-" if e.cost_usd is None else f"{e.cost_usd:.3g}",
            "-" if e.latency_s is None else f"{e.latency_s:.2f}",
            "yes" if e.eligible else "[red]no[/]",
            e.note,
        )
    out.print(table)
    verb = "escalating in this order" if len(decision.models) > 1 else ""
    out.print(f"chose: [bold]{' -> '.join(decision.models)}[/] {verb}")
    out.print(f"why: {decision.reason}", markup=False, highlight=False)
    if not decision.target_met:
        out.print("[bold red]the route's target is NOT met for this request[/]")
    out.print(
        f"decided in {decision.decision_s * 1000:.1f} ms "
        f"(the first decision, loading the route: {first.decision_s * 1000:.0f} ms)"
    )
    if response is not None:
        out.print(f"\nanswer from {response.model}: {response.text}", markup=False)
        tried = ", ".join(a.model for a in response.attempts) or "none"
        out.print(f"escalated from: {tried}; total cost ${response.total_cost_usd:.6f}")


@route_app.command("setup")
def route_setup(fleet_file: FleetOption = None) -> None:
    """Convert the MiniLM embedder to GGUF once (checked against torch) into the cache."""
    from shoal.models.embedder import ensure_gguf

    fleet = _fleet(fleet_file)
    path = _guard(partial(ensure_gguf, fleet.cache_dir))
    out.print(f"MiniLM embedder ready: {path}")
