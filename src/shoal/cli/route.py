"""`shoal route ...` and `shoal outcomes ...`: routing commands (registered by cli/main.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    from shoal.routing.calibrate import Calibration
    from shoal.routing.evaluate import Curve
    from shoal.routing.outcomes import OutcomeTable
    from shoal.routing.predictive import Featurizer
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
    ids = model_ids or [
        c.id
        for c in fleet.cards()
        if c.runs == "local" and not c.single_task and fleet.installed(c.id)
    ]
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
        help="Outcome table: a CSV path, or routellm:mmlu, routellm:mt-bench, routerbench:TASK, "
        "routerdc:TASK.",
    ),
]
TargetOption = Annotated[
    float | None,
    typer.Option(
        "--target",
        min=0.01,
        max=1.0,
        help="Quality target: this share of the best model's quality (default: the route's, "
        "else 0.95).",
    ),
]
ModelsOption = Annotated[
    list[str] | None, typer.Option("--model", "-m", help="Only these models of the table (repeat).")
]
CostOption = Annotated[
    str,
    typer.Option(
        "--cost",
        help="known: each call's cost is known before it (token prices, a fixed-length answer); "
        "predicted: regressed on the query.",
    ),
]
ZOption = Annotated[
    float,
    typer.Option(
        "--z", min=0.0, help="Margin asked of the target on the train split, in standard errors."
    ),
]


def _load_table(source: str) -> OutcomeTable:
    from shoal.routing import importers

    return importers.load(source)


def _cost_mode(cost: str) -> str:
    from shoal.errors import ConfigError

    if cost not in ("known", "predicted"):
        raise ConfigError(f"unknown cost mode {cost!r}; valid: known, predicted")
    return "known" if cost == "known" else "learned"


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        err.print(f"[bold red]WARNING:[/] {w}", highlight=False)


@contextmanager
def _embedding_bar(feat: Featurizer) -> Iterator[None]:
    """A progress bar with an ETA while texts are embedded for the first time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from shoal.models.embedder import EmbeddingCache

    cache = feat.embedder
    if not isinstance(cache, EmbeddingCache):
        yield
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("embedding new texts (once: cached after)", visible=False)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, visible=True)

        cache.progress = progress
        try:
            yield
        finally:
            cache.progress = None


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
    name: Annotated[
        str, typer.Argument(help="A predictive route of the fleet file, or a predictor kind.")
    ],
    outcomes: OutcomesOption = None,
    target: TargetOption = None,
    model_ids: ModelsOption = None,
    cost: CostOption = "predicted",
    z: ZOption = 1.0,
    seed: Annotated[int, typer.Option(help="The train/test split, when the table has none.")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    fleet_file: FleetOption = None,
) -> None:
    """Fit a route to its target on the table's train split; report it on the test split.

    NAME is a predictive route of the fleet file (saved where the route loads it), or a
    predictor kind (knn, logistic, mlp, mf, ensemble, cluster) fit on --outcomes over its
    models or --model (saved in the cache folder; load it with PredictiveRouter.load).
    """
    fleet = _fleet(fleet_file)
    cal = _guard(partial(_calibrate, fleet, name, outcomes, target, model_ids, cost, z, seed))
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
        + (
            "target met"
            if cal.met
            else f"[red]target NOT met: every query goes to {cal.fallback}[/]"
        )
    )
    if held is not None:
        out.print(
            f"  held out ({summary['test_queries']} queries): quality {held.quality:.3f} "
            f"(95% CI {held.quality_ci[0]:.3f}-{held.quality_ci[1]:.3f}) = "
            f"{held.quality_ratio:.1%} of the best model's, cost {held.cost_ratio:.1%} of its "
            f"cost, {held.best_share:.0%} of calls to it; "
            + ("target met" if held.met else "[red]target NOT met on held-out data[/]")
        )
    _warn(cal.warnings)
    out.print(f"  saved: {summary['saved']}", highlight=False)


def _calibrate(
    fleet: Fleet,
    name: str,
    outcomes: str | None,
    target: float | None,
    model_ids: list[str] | None,
    cost: str,
    z: float,
    seed: int,
) -> Calibration:
    import hashlib

    from shoal.errors import ConfigError, UnknownRouteError
    from shoal.routing.calibrate import Target
    from shoal.routing.config import calibrate_route, fit_route
    from shoal.routing.predictive import PREDICTOR_KINDS, minilm_featurizer
    from shoal.settings import PredictiveRouteSpec

    configured = [s.name for s in fleet.settings.routes]
    cost_mode = _cost_mode(cost)
    if name not in configured and name not in PREDICTOR_KINDS:
        raise UnknownRouteError(name, [*configured, *PREDICTOR_KINDS])
    feat = minilm_featurizer(fleet.cache_dir)
    if name in configured:
        spec = _spec(fleet, name)
        if not isinstance(spec, PredictiveRouteSpec):
            raise ConfigError(f"route {name!r} is a {spec.kind} route: only predictive routes fit")
        if target is not None or model_ids:
            raise ConfigError(
                f"route {name!r} states its target and models in the fleet file: "
                "--target and --model are for a predictor kind"
            )
        with _embedding_bar(feat):
            return calibrate_route(
                spec,
                fleet,
                outcomes=outcomes,
                seed=seed,
                featurizer=feat,
                cost_mode=cost_mode,
                confidence_z=z,
            )
    if outcomes is None:
        raise ConfigError("give --outcomes (a table path or an importer name)")
    table = _load_table(outcomes)
    models = list(model_ids or table.models)
    goal = Target(quality_ratio=target if target is not None else 0.95)
    key = json.dumps([outcomes, models, goal.model_dump(), cost_mode, z, seed]).encode()
    path = fleet.cache_dir / "routes" / f"{name}-{hashlib.sha256(key).hexdigest()[:12]}.npz"
    with _embedding_bar(feat):
        cal = fit_route(
            table,
            models,
            name,
            goal,
            path,
            featurizer=feat,
            cost_mode=cost_mode,
            seed=seed,
            confidence_z=z,
        )
    cal.extra["outcomes"] = outcomes
    return cal


@route_app.command("eval")
def route_eval(
    outcomes: OutcomesOption = None,
    route: Annotated[
        list[str] | None,
        typer.Option(
            "--route",
            help="A route of the fleet file, a predictor kind, cascade, or KIND+cascade "
            "(repeat; default: ensemble).",
        ),
    ] = None,
    target: TargetOption = None,
    model_ids: ModelsOption = None,
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, help="Splits to run (medians and every split).")
    ] = 1,
    cost: CostOption = "predicted",
    z: ZOption = 1.0,
    png: Annotated[Path | None, typer.Option(help="Cost-quality plot of the first split.")] = None,
    seed: Annotated[int, typer.Option(help="The first split's seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    fleet_file: FleetOption = None,
) -> None:
    """APGR, CPT(50/80%), cost at 95% of the best model, AIQ: each route against random,
    always-cheapest, best single model, zero router and oracle, on held-out splits; and each
    route calibrated to the target on the train split only."""
    from shoal.errors import ConfigError
    from shoal.routing import evaluate as ev

    fleet = _fleet(fleet_file)
    if outcomes is None:
        _guard(partial(_fail, ConfigError("give --outcomes (a table path or an importer name)")))
        return
    routes = route or ["ensemble"]
    table = _guard(partial(_load_table, outcomes))
    run = partial(_evaluate_routes, fleet, table, routes, target, model_ids, seeds, seed, cost, z)
    summary, first = _guard(run)
    path = png or Path(f"route-eval-{'-'.join(routes).replace('+', '_')}.png")
    marks = [
        (f"{name} calibrated", c["cost_ratio_each"][0], c["quality_ratio_each"][0] * first.q_best)
        for name, c in summary["calibrated"].items()
    ]
    ev.plot(first.test, first.curves, path, title=f"{table.name} (held-out split)", marks=marks)
    _warn(summary["warnings"])
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=float))
        return
    out.print(
        f"{table.name}: {summary['test_queries']} held-out queries in each of "
        f"{summary['splits']} split(s); best model {summary['best']}"
    )
    out.print(ev.format_table({"routes": summary["frontier"]}), markup=False, highlight=False)
    what = "medians over the splits; " if summary["splits"] > 1 else ""
    out.print(f"({what}costs are fractions of the best model's; CPT = share of calls to it)")
    out.print(f"calibrated on train only to {summary['target']}, on the held-out splits:")
    for name, c in summary["calibrated"].items():
        falls = [f for f in c["fallback_each"] if f]
        out.print(
            f"  {name}: cost {c['cost_ratio_median']:.1%} of the best model's "
            f"(each: {', '.join(f'{v:.1%}' for v in c['cost_ratio_each'])}), quality "
            f"{c['quality_ratio_median']:.1%} "
            f"(each: {', '.join(f'{v:.1%}' for v in c['quality_ratio_each'])}); target met on "
            f"{c['met_on_test']}/{summary['splits']}"
            + (f"; fell back to the best model on {len(falls)}" if falls else ""),
            highlight=False,
        )
    out.print(f"plot: {path}")


@dataclass
class _FirstSplit:
    test: OutcomeTable
    curves: list[Curve]
    q_best: float


def _evaluate_routes(
    fleet: Fleet,
    table: OutcomeTable,
    routes: list[str],
    target: float | None,
    model_ids: list[str] | None,
    seeds: int,
    first_seed: int,
    cost: str,
    z: float,
) -> tuple[dict[str, Any], _FirstSplit]:
    from shoal.errors import UnknownRouteError
    from shoal.routing import evaluate as ev
    from shoal.routing.calibrate import Target
    from shoal.routing.experiment import Experiment, split_indices, summarise
    from shoal.routing.predictive import PREDICTOR_KINDS, minilm_featurizer
    from shoal.settings import CascadeRouteSpec, PredictiveRouteSpec

    configured = [s.name for s in fleet.settings.routes]
    kinds = [*PREDICTOR_KINDS, "cascade", *(f"{k}+cascade" for k in PREDICTOR_KINDS)]
    kinds_of: dict[str, str] = {}  # the experiment's route -> the name shown
    orders: dict[str, list[str]] = {}
    models = list(model_ids or table.models)
    goal = None if target is None else Target(quality_ratio=target)
    for name in routes:
        if name in kinds:
            kinds_of[name] = name
            continue
        if name not in configured:
            raise UnknownRouteError(name, [*configured, *kinds])
        spec = _spec(fleet, name)
        if isinstance(spec, PredictiveRouteSpec):
            kinds_of[spec.predictor] = f"{name} ({spec.predictor})"
            models = list(spec.models)
            goal = goal or Target.model_validate(spec.target.model_dump())
        elif isinstance(spec, CascadeRouteSpec):
            orders[name] = list(spec.models)
            models = list(spec.models)
        else:
            raise UnknownRouteError(name, [*(s for s in configured), *kinds])
    table = table.select_models(models)
    goal = goal or Target(quality_ratio=0.95)
    feat = minilm_featurizer(fleet.cache_dir)

    def features(texts: Any) -> Any:
        with _embedding_bar(feat):
            return feat(texts)

    def embed_answers(texts: Any) -> Any:
        with _embedding_bar(feat):
            return feat.embedder.embed(texts)

    exp = Experiment(
        table,
        features,
        routes=list(kinds_of),
        target=goal,
        cost_mode=_cost_mode(cost),
        embed_answers=embed_answers,
        confidence_z=z,
        confidence_cascades=orders,
    )
    splits = split_indices(table, range(first_seed, first_seed + seeds))
    results = [exp.run(*s) for s in splits]
    for r in results:
        for old, new in kinds_of.items():
            for part in (r.metrics, r.calibrated):
                if old in part:
                    part[new] = part.pop(old)
            for c in r.curves:
                c.label = kinds_of.get(c.label, c.label)
    summary = summarise(results, table.name)
    ref = ev.Reference.of(results[0].test)
    summary.update(
        {
            "target": goal.describe(),
            "best": table.models[ref.best],
            "test_queries": len(results[0].test),
        }
    )
    return summary, _FirstSplit(results[0].test, results[0].curves, ref.q_best)


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
