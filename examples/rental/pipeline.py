"""The rental assistant: criteria -> candidates -> shortlist -> scores -> a ranked answer.

Four model steps, each behind a route, and plain Python for what Python does better: checking
the model's reading of the request against its words, filters (and what to relax when nothing
passes them), the arithmetic of a score from the listing's facts, and checking that the written
recommendation names the ranked #1 (`explain.py`). The city is any Inside Airbnb listings file
(`data.py`): the `city` input is a bundled city's name, a file's path, or a `City`'s fields.
The routed pipeline sends each step to the smallest model that does it well; the `all_large`
form sends every step to the large model, the baseline it is measured against.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from shoal.engine import Engine
from shoal.pipeline.graph import ModelStep, Pipeline, PythonStep
from shoal.routing.config import build_route
from shoal.settings import FallbackRouteSpec, FixedRouteSpec
from shoal_examples.rental.criteria import CRITERIA_SYSTEM, Criteria, Reading, ground, near_downtown
from shoal_examples.rental.data import Listing, city_of, market, review_sample
from shoal_examples.rental.explain import checked, written
from shoal_examples.rental.filters import filters, relax
from shoal_examples.rental.scoring import Fit, assess, rating_points, wishes_met

SMALL, LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"

# Which model answers each model step. Reading the request and choosing the finalists decide
# which listings the guest sees, and happen once per request: the large model (the small one if
# it fails). The fan-out (one reading per finalist) and the explanation are where the calls are:
# the small model. (With the shortlist on the small model too, its picks often differed from
# the large model's, and so did the finalists: see bench/README.md.)
ROUTED = {
    "rental-criteria": FallbackRouteSpec(
        kind="fallback", name="rental-criteria", models=(LARGE, SMALL)
    ),
    "rental-shortlist": FallbackRouteSpec(
        kind="fallback", name="rental-shortlist", models=(LARGE, SMALL)
    ),
    "rental-score": FixedRouteSpec(kind="fixed", name="rental-score", model=SMALL),
    "rental-explain": FixedRouteSpec(kind="fixed", name="rental-explain", model=SMALL),
}
SHORTLIST_SIZE = 8
FINALISTS = 5


class Candidates(BaseModel):
    listings: list[Listing]
    matched: int
    note: str  # how many listings each filter left
    advice: str  # when none is left: which stated constraint to relax
    where: str  # the city's listings, rows skipped, and where distances are measured from


class Picks(BaseModel):
    """Positions in the shortlist menu (1-based): small numbers, not long listing ids."""

    picks: list[Annotated[int, Field(ge=1, le=SHORTLIST_SIZE)]] = Field(max_length=FINALISTS)


class Finalist(BaseModel):
    listing: Listing
    reviews: list[str]

    def card(self) -> str:
        x = self.listing
        said = " ".join(f'"{r}"' for r in self.reviews) or "none in the data"
        rating = f"{x.rating:.2f}/5 over {x.reviews} review(s)" if x.rating else "unrated"
        area = f" | about the area: {x.area[:150]}" if x.area else ""
        return f"{x.summary()}{area} | rating {rating}\nReviews: {said}"


class Ranked(BaseModel):
    listing_id: int
    title: str
    room_type: str
    price: float
    bedrooms: int
    accommodates: int
    km_to_center: float
    rating: float | None
    reviews: int
    score: float
    wishes: float  # the share of the wishes met (required ones count double)
    reason: str  # facts of the listing, each checkable


class RentalAnswer(BaseModel):
    criteria: Criteria
    ranked: list[Ranked]
    explanation: str
    # Who wrote the explanation: the model (checked against the ranking), the template (the
    # model's text did not pass the checks, or there was none), or the filters (nothing fit).
    explained_by: Literal["model", "template", "filters", "none"]
    where: str
    note: str


# -- plain Python steps -------------------------------------------------------------------------


def criteria(request: str, read: Reading) -> Criteria:
    """The criteria as the model read them, grounded in the request's own words."""
    return ground(request, read)


def candidates(criteria: Criteria, city: Any) -> Candidates:
    """Hard filters (price, size, room type, checkable must-haves, downtown), then the best
    pre-ranked; when none passes, which constraint to relax."""
    found = market(city_of(city))
    tests = filters(criteria)
    pool = list(found.listings)
    steps = [f"{len(pool)} listings in {found.city.name}"]
    for test in tests:
        pool = [x for x in pool if test.test(x)]
        steps.append(f"{test.label}: {len(pool)}")
    downtown = bool(criteria.area and near_downtown(criteria.area))

    def pre_rank(x: Listing) -> tuple[float, ...]:
        """Nearest first when downtown was asked for, then the wishes its words bear out,
        then its rating (pulled toward a typical one over few reviews), then the price."""
        wished = wishes_met(criteria, x, []).share
        return (x.km_to_center if downtown else 0, -wished, -(rating_points(x) or 0), x.price)

    pool.sort(key=lambda x: (*pre_rank(x), x.id))
    return Candidates(
        listings=pool[:SHORTLIST_SIZE],
        matched=len(pool),
        note=" -> ".join(steps),
        advice="" if pool else relax(found.listings, tests),
        where=found.describe(),
    )


def menus(candidates: Candidates) -> list[str]:
    """The shortlist prompt's list of candidates; none (no call is made) when every candidate
    is a finalist anyway."""
    if len(candidates.listings) <= FINALISTS:
        return []
    return ["\n".join(f"{i}. {x.summary()}" for i, x in enumerate(candidates.listings, start=1))]


def finalists(candidates: Candidates, shortlist: list[Picks | None], city: Any) -> list[Finalist]:
    """The model's picks (positions outside the menu are dropped), topped up from the
    pre-ranking."""
    menu = candidates.listings
    picked = [n - 1 for p in shortlist if p for n in p.picks if 1 <= n <= len(menu)]
    order = list(dict.fromkeys([*picked, *range(len(menu))]))[:FINALISTS]
    return [Finalist(listing=menu[i], reviews=review_sample(city, menu[i].id)) for i in order]


def cards(finalists: list[Finalist]) -> list[str]:
    """What the scorer reads of each finalist: the listing in one paragraph, and its reviews."""
    return [f.card() for f in finalists]


def wishes(criteria: Criteria) -> str:
    """The wishes, as the scorer reads them."""
    listed = [f"{w} (required)" if must else w for w, must in criteria.wishes()]
    return "; ".join(listed) or "nothing beyond the filters"


def rank(criteria: Criteria, finalists: list[Finalist], scores: list[Fit | None]) -> list[Ranked]:
    """The finalists the scorer read, best first: by score, then by the wishes they meet,
    then by rating, then by price."""
    ranked = []
    for f, fit in zip(finalists, scores, strict=True):
        if fit is None:
            continue
        x = f.listing
        got = assess(criteria, x, f.reviews, fit)
        ranked.append(
            Ranked(
                listing_id=x.id,
                title=x.title,
                room_type=x.room_type,
                price=x.price,
                bedrooms=x.bedrooms,
                accommodates=x.accommodates,
                km_to_center=x.km_to_center,
                rating=x.rating,
                reviews=x.reviews,
                score=got.score,
                wishes=got.wishes,
                reason=got.reason,
            )
        )
    ranked.sort(key=lambda r: (-r.score, -r.wishes, -(r.rating or 0), r.price, r.listing_id))
    return ranked


def _facts(i: int, r: Ranked) -> str:
    rating = f", rated {r.rating:.2f}/5 over {r.reviews} review(s)" if r.rating else ""
    return (
        f'#{i} "{r.title}": {r.room_type}, ${r.price:.0f}/night, {r.bedrooms} bedroom(s), '
        f"sleeps {r.accommodates}, {r.km_to_center:.1f} km from the center{rating}; "
        f"score {r.score:.1f}/10; {r.reason}"
    )


def briefs(ranked: list[Ranked]) -> list[str]:
    """What the explanation step is given: the top three with their facts, and which one to
    recommend; none when nothing was ranked (no call is made)."""
    if not ranked:
        return []
    lines = [_facts(i, r) for i, r in enumerate(ranked[:3], start=1)]
    return ["\n".join([*lines, f'Recommend #1, "{ranked[0].title}".'])]


def answer(
    request: str,
    criteria: Criteria,
    candidates: Candidates,
    ranked: list[Ranked],
    briefs: list[str],
    explain: list[str | None],
) -> RentalAnswer:
    """The ranking and its explanation: the model's text when it passes the checks (names the
    ranked #1 first, no loop, no number it was not given), else one written from the facts."""
    said = next((e for e in explain or [] if e), None)
    facts = " ".join([request, *briefs])
    text = checked(said, ranked, facts)
    by: Literal["model", "template", "filters", "none"] = "model"
    if not candidates.listings:
        text, by = candidates.advice, "filters"
    elif not ranked:
        text, by = "", "none"
    elif text is None:
        text, by = written(ranked), "template"
    return RentalAnswer(
        criteria=criteria,
        ranked=ranked,
        explanation=text,
        explained_by=by,
        where=candidates.where,
        note=f"{candidates.matched} listing(s) passed the filters ({candidates.note})",
    )


# -- the pipeline -------------------------------------------------------------------------------


def build(models: dict[str, str] | None = None) -> Pipeline:
    """The rental pipeline; `models` maps each route name to another model or route."""
    use = {name: name for name in ROUTED} | dict(models or {})
    return Pipeline(
        "rental",
        inputs=["request", "city"],
        output="answer",
        steps=[
            ModelStep(
                "read",
                model=use["rental-criteria"],
                output=Reading,
                inputs=("request",),
                system=CRITERIA_SYSTEM,
                prompt="Request: {request}\nCriteria as JSON:",
                max_tokens=200,
            ),
            PythonStep("criteria", criteria),
            PythonStep("candidates", candidates),
            PythonStep("menus", menus),
            ModelStep(
                "shortlist",
                model=use["rental-shortlist"],
                output=Picks,
                inputs=("request", "menus"),
                map_over="menus",
                system="You shortlist rental listings. Answer with their numbers only.",
                prompt=f"Request: {{request}}\nListings:\n{{item}}\n\nReturn the numbers of "
                f"the {FINALISTS} listings that best fit the request, best first.",
                max_tokens=120,
                optional=True,
                on_deadline="skip",  # the pre-ranking stands in for the shortlist
            ),
            PythonStep("finalists", finalists),
            PythonStep("cards", cards),
            PythonStep("wishes", wishes),
            ModelStep(
                "scores",
                model=use["rental-score"],
                output=Fit,
                inputs=("request", "wishes", "cards"),
                map_over="cards",
                system="You check a rental listing against a guest's wishes, using only what "
                "the listing and its reviews say.",
                prompt="The guest asked: {request}\nWishes: {wishes}\n\nListing: {item}\n\n"
                "reviews: what its reviews say overall (positive, mixed, negative, or none if it "
                "has none). fit: how well it fits the request (poor, fair, good or great).",
                max_tokens=40,
            ),
            PythonStep("ranked", rank),
            PythonStep("briefs", briefs),
            ModelStep(
                "explain",
                model=use["rental-explain"],
                inputs=("request", "briefs"),
                map_over="briefs",
                system="You are a helpful rental assistant. Be concise and concrete.",
                prompt="The guest asked: {request}\nThe ranking, best first:\n{item}\n\nIn two "
                "or three sentences, tell the guest why #1 is the best match, calling it by its "
                "name, and note one trade-off. Use only the facts above.",
                max_tokens=110,
                optional=True,
                on_deadline="skip",  # the ranked table is the answer; the prose is a bonus
            ),
            PythonStep("answer", answer),
        ],
    )


def all_large() -> Pipeline:
    """Every model step on the large model: the baseline."""
    return build({name: LARGE for name in ROUTED})


def register_routes(engine: Engine) -> None:
    """Serve the rental routes on `engine` (once)."""
    for name, spec in ROUTED.items():
        if name not in engine.route_names:
            engine.add_route(name, build_route(spec, engine.fleet, traces=engine.traces))


def pipeline(engine: Engine) -> Pipeline:
    """The rental pipeline, its routes registered on `engine`: the `shoal.pipelines` entry point
    (pyproject.toml) that `shoal serve --pipeline rental` finds."""
    register_routes(engine)
    return build()
