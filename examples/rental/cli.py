"""`shoal run rental "request" --city albany` or `--listings FILE`: the rental assistant's own
command, registered under the entry-point group `shoal.run_commands` (pyproject.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shoal.cli.common import FleetOption, err, fail, out
from shoal.cli.run import print_cuts, run_pipeline
from shoal.engine import Engine
from shoal.errors import ConfigError, ShoalError
from shoal.fleet import Fleet
from shoal.pipeline.run import RunResult
from shoal_examples.rental import pipeline as rental
from shoal_examples.rental.data import BUNDLED, City, bundled, from_file, market, parse_center

DEFAULT_CITY = "albany"


def run_rental(
    request: Annotated[str, typer.Argument(help="What the guest is looking for.")],
    city: Annotated[
        str | None,
        typer.Option(
            help=f"A bundled city: {' | '.join(BUNDLED)} (default {DEFAULT_CITY}; found in "
            "$SHOAL_DATA_DIR/airbnb, else in a shared/data folder above here)."
        ),
    ] = None,
    listings: Annotated[
        Path | None,
        typer.Option(help="A city's Inside Airbnb listings file (listings.csv or .csv.gz)."),
    ] = None,
    reviews: Annotated[
        Path | None, typer.Option(help="Its reviews file (reviews.csv or .csv.gz), if any.")
    ] = None,
    center: Annotated[
        str | None,
        typer.Option(
            help="LAT,LON distances are measured from (default: a bundled city's downtown, "
            "else the densest cluster of listings in the file)."
        ),
    ] = None,
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
        place = where(city, listings, reviews, center)
        market(place)  # a file not in the layout fails here, before any model loads
        engine = Engine(Fleet.from_file(fleet_file))
        rental.register_routes(engine)
        pipeline = rental.all_large() if all_large else rental.build()
    except ShoalError as exc:
        raise fail(exc) from None
    run_pipeline(
        engine,
        pipeline,
        {"request": request, "city": place.model_dump(mode="json")},
        budget_usd=budget,
        deadline_s=deadline,
        use_cache=not no_cache,
        as_json=as_json,
        render=render,
    )


def where(
    city: str | None, listings: Path | None, reviews: Path | None, center: str | None
) -> City:
    """The listings the flags name: a bundled city, or a file, with its reviews and center."""
    if city is not None and listings is not None:
        raise ConfigError("give --city or --listings, not both")
    place = bundled(city or DEFAULT_CITY) if listings is None else from_file(listings)
    changes: dict[str, Any] = {}
    if reviews is not None:
        changes["reviews"] = reviews
    if center is not None:
        changes |= {"center": parse_center(center), "center_name": "the center given"}
    return place.model_copy(update=changes)


def render(result: RunResult) -> None:
    """The criteria, where the listings come from, the ranked listings (their reasons below
    the table, so it fits 80 columns) and the explanation."""
    answer = result.output or {}
    criteria = answer.get("criteria") or result.values.get("criteria") or {}
    if criteria:
        wanted = ", ".join(f"{k}={v}" for k, v in criteria.items() if v not in (None, [], ""))
        out.print(f"[bold]criteria[/] {wanted or 'none stated'}", highlight=False)
    candidates = result.values.get("candidates") or {}
    place = answer.get("where") or candidates.get("where")
    if place:
        out.print(f"[dim]{place}[/]", highlight=False)
    ranked = answer.get("ranked") or []
    if ranked:
        rows = [[str(i), *_facts(r), f"{r['score']:.1f}"] for i, r in enumerate(ranked, start=1)]
        print_table([*HEADERS, "score"], rows)
        for i, r in enumerate(ranked, start=1):
            out.print(f"{i}. {r['reason']}", highlight=False)
    elif result.status != "ok":
        _pre_ranked(result)
    if answer.get("explanation"):
        out.print()
        out.print(answer["explanation"], highlight=False)
    if answer.get("explained_by") == "template":
        err.print("[dim](the model's text did not pass the checks: written from the facts)[/]")
    if answer.get("note"):
        err.print(f"[dim]{answer['note']}[/]", highlight=False)


HEADERS = ["#", "listing", "$/night", "bd", "sleeps", "km", "rating"]


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A table as wide as the terminal at most: the listing's title (the second column) is cut
    short to fit, every other column is as wide as its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    room = out.width - (sum(widths) - widths[1]) - 2 * (len(headers) - 1) - 1
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for i, header in enumerate(headers):
        if i == 1:
            table.add_column(header, overflow="ellipsis", no_wrap=True, max_width=max(8, room))
        else:
            table.add_column(header, justify="right", no_wrap=True, min_width=widths[i])
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _pre_ranked(result: RunResult) -> None:
    """A run cut short before its ranking: the listings that passed the filters, best
    pre-ranked first, and which steps were cut and why."""
    listings = (result.values.get("candidates") or {}).get("listings") or []
    if listings:
        out.print("[bold]no ranking in time; the listings that passed the filters, pre-ranked:[/]")
        print_table(HEADERS, [[str(i), *_facts(x)] for i, x in enumerate(listings[:5], start=1)])
    print_cuts(result)


def _facts(listing: dict[str, Any]) -> list[str]:
    """A listing's title, price, bedrooms, guests, distance and rating, as table cells."""
    rating = listing["rating"]
    return [
        listing["title"],
        f"{listing['price']:.0f}",
        str(listing["bedrooms"]),
        str(listing["accommodates"]),
        f"{listing['km_to_center']:.1f}",
        f"{rating:.2f}" if rating is not None else "-",
    ]
