"""`shoal run rental "request" --city albany`: the rental assistant's own command, registered
under the entry-point group `shoal.run_commands` (pyproject.toml)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from shoal.cli.common import FleetOption, err, fail, out
from shoal.cli.run import run_pipeline
from shoal.engine import Engine
from shoal.errors import ShoalError
from shoal.fleet import Fleet
from shoal.pipeline.run import RunResult
from shoal_examples.rental import pipeline as rental


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
    try:
        engine = Engine(Fleet.from_file(fleet_file))
        rental.register_routes(engine)
        pipeline = rental.all_large() if all_large else rental.build()
    except ShoalError as exc:
        raise fail(exc) from None
    run_pipeline(
        engine,
        pipeline,
        {"request": request, "city": city},
        budget_usd=budget,
        deadline_s=deadline,
        use_cache=not no_cache,
        as_json=as_json,
        render=render,
    )


def render(result: RunResult) -> None:
    """The criteria, the ranked listings and the explanation."""
    answer = result.output or {}
    criteria = answer.get("criteria") or result.values.get("criteria") or {}
    if criteria:
        wanted = ", ".join(f"{k}={v}" for k, v in criteria.items() if v not in (None, [], ""))
        out.print(f"[bold]criteria[/] {wanted}", highlight=False)
    table = Table("#", "listing", "$/night", "bedrooms", "km to downtown", "rating", "score", "why")
    for i, r in enumerate(answer.get("ranked") or [], start=1):
        table.add_row(str(i), *_facts(r), f"{r['score']}/10", r["reason"])
    if table.row_count:
        out.print(table)
    elif result.status != "ok":
        _pre_ranked(result)
    if answer.get("explanation"):
        out.print(answer["explanation"], highlight=False)
    if answer.get("note"):
        err.print(f"[dim]{answer['note']}[/]", highlight=False)


def _pre_ranked(result: RunResult) -> None:
    """A run cut short before its ranking: what it had finished, the listings that passed the
    filters, best pre-ranked first, and which steps were cut and why."""
    listings = (result.values.get("candidates") or {}).get("listings") or []
    if listings:
        table = Table("#", "listing", "$/night", "bedrooms", "km to downtown", "rating")
        for i, item in enumerate(listings[:5], start=1):
            table.add_row(str(i), *_facts(item))
        out.print("[bold]no ranking in time; the listings that passed the filters, pre-ranked:[/]")
        out.print(table)
    for name, step in result.steps.items():
        if step.status != "ok":
            why = step.error or "; ".join(step.degraded) or "not finished"
            err.print(f"[yellow]cut: {name} ({why})[/]", highlight=False)


def _facts(listing: dict[str, Any]) -> list[str]:
    """A listing's title, price, bedrooms, distance and rating, as table cells."""
    rating = listing["rating"]
    return [
        listing["title"],
        f"{listing['price']:.0f}",
        str(listing["bedrooms"]),
        f"{listing['km_to_downtown']:.1f}",
        f"{rating:.2f}" if rating is not None else "-",
    ]
