"""The rental assistant: criteria -> candidates -> shortlist -> scores -> a ranked answer.

Four model steps, each behind a route, and plain Python for what Python does better: checking
the model's reading of the request against its words, filters, and the arithmetic of a score.
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
from shoal_examples.rental.criteria import (
    CRITERIA_SYSTEM,
    Criteria,
    ground,
    near_downtown,
    stems,
)
from shoal_examples.rental.data import Listing, load_listings, review_sample

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
    note: str


class Picks(BaseModel):
    """Positions in the shortlist menu (1-based): small numbers, not long listing ids."""

    picks: list[Annotated[int, Field(ge=1, le=SHORTLIST_SIZE)]] = Field(max_length=FINALISTS)


class Finalist(BaseModel):
    listing: Listing
    reviews: list[str]

    def card(self) -> str:
        said = " ".join(f'"{r}"' for r in self.reviews) or "none yet"
        rating = f"{self.listing.rating:.2f}" if self.listing.rating else "unrated"
        return f"{self.listing.summary()} | rating {rating}\nReviews: {said}"


class Fit(BaseModel):
    """The scorer's reading of one listing: what its reviews say, how well it fits, and why.
    The 0-10 score is computed from these and the listing's facts (`points`), not asked for:
    the models' numbers out of ten were noise (the large one gave 0 or 6 to most listings),
    while a verdict in words is something a small model gives about as well as a large one."""

    reviews: Literal["positive", "mixed", "negative", "none"]
    fit: Literal["poor", "fair", "good", "great"]
    reason: str = Field(max_length=140)


class Ranked(BaseModel):
    listing_id: int
    title: str
    price: float
    bedrooms: int
    km_to_downtown: float
    rating: float | None
    score: int
    reason: str


class RentalAnswer(BaseModel):
    criteria: Criteria
    ranked: list[Ranked]
    explanation: str
    note: str


# -- plain Python steps -------------------------------------------------------------------------

# Amenity words a filter can check; anything else is left to the models.
_AMENITY_WORDS = {
    "parking": ("parking", "garage"),
    "wifi": ("wifi",),
    "kitchen": ("kitchen",),
    "washer": ("washer",),
    "dryer": ("dryer",),
    "laundry": ("washer", "dryer", "laundry"),
    "air conditioning": ("air conditioning",),
    "ac": ("air conditioning",),
    "pets": ("pets allowed",),
    "pet": ("pets allowed",),
    "dog": ("pets allowed",),
    "workspace": ("workspace",),
    "desk": ("workspace",),
    "fireplace": ("fireplace",),
    "breakfast": ("breakfast",),
    "pool": ("pool",),
    "gym": ("gym",),
    "hot tub": ("hot tub",),
    "tv": ("tv",),
}
_DOWNTOWN_KM = 3.0


def _amenity_terms(wish: str) -> tuple[str, ...] | None:
    wish = wish.lower()
    for word, terms in _AMENITY_WORDS.items():
        if word in wish:
            return terms
    return None


def _has(listing: Listing, terms: tuple[str, ...]) -> bool:
    return any(any(t in a.lower() for t in terms) for a in listing.amenities)


def criteria(request: str, read: Criteria) -> Criteria:
    """The criteria as the model read them, grounded in the request's own words."""
    return ground(request, read)


def candidates(criteria: Criteria, city: str) -> Candidates:
    """Hard filters (price, size, checkable must-haves, downtown), then the best pre-ranked."""
    pool = list(load_listings(city))
    steps = [f"{len(pool)} listings in {city}"]

    def keep(label: str, test: Any) -> None:
        nonlocal pool
        pool = [x for x in pool if test(x)]
        steps.append(f"{label}: {len(pool)}")

    if criteria.max_price:
        keep(f"at most ${criteria.max_price:.0f}/night", lambda x: x.price <= criteria.max_price)
    if criteria.guests:
        keep(f"sleeps {criteria.guests}+", lambda x: x.accommodates >= (criteria.guests or 0))
    if criteria.bedrooms:
        keep(f"{criteria.bedrooms}+ bedrooms", lambda x: x.bedrooms >= (criteria.bedrooms or 0))
    for wish in criteria.must_haves:
        terms = _amenity_terms(wish)
        if terms:
            keep(f"has {wish}", lambda x, t=terms: _has(x, t))
    downtown = bool(criteria.area and near_downtown(criteria.area))
    if downtown:
        keep(f"within {_DOWNTOWN_KM:g} km of downtown", lambda x: x.km_to_downtown <= _DOWNTOWN_KM)
    matched = len(pool)
    pool.sort(key=lambda x: (x.km_to_downtown if downtown else 0, -(x.rating or 0), x.price))
    note = " -> ".join(steps)
    if not pool:
        note = f"No listing fits: {note}. Loosen the tightest of these and ask again."
    return Candidates(listings=pool[:SHORTLIST_SIZE], matched=matched, note=note)


def menus(candidates: Candidates) -> list[str]:
    """The shortlist prompt's list of candidates; none (no call is made) when every candidate
    is a finalist anyway."""
    if len(candidates.listings) <= FINALISTS:
        return []
    return ["\n".join(f"{i}. {x.summary()}" for i, x in enumerate(candidates.listings, start=1))]


def finalists(candidates: Candidates, shortlist: list[Picks | None], city: str) -> list[Finalist]:
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


def _mentions(text: str, wish: str) -> bool:
    """Whether a wish the amenity list cannot settle is borne out by the listing's own text:
    one of its words (or the word's stem) is there; for "no stairs", the word is not."""
    negated = wish.lower().startswith(("no ", "not ", "without "))
    found = any(stem in text for stem in stems(wish))
    return not found if negated else found


_FIT_POINTS = {"poor": 0.0, "fair": 0.7, "good": 1.3, "great": 2.0}
_REVIEW_POINTS = {"positive": 2.0, "mixed": 1.0, "none": 1.0, "negative": 0.0}


def points(criteria: Criteria, finalist: Finalist, fit: Fit) -> int:
    """The 0-10 score. 4 for the wishes met, required ones counting double: the amenity list
    settles those it can, the listing's text and reviews the rest. 2 for the scorer's overall
    fit, 2 for what it read in the reviews. 1 for the price against the budget, 1 for the
    distance when downtown was asked for."""
    listing = finalist.listing
    text = " ".join(
        [listing.title, listing.description, *listing.amenities, *finalist.reviews]
    ).lower()
    weight = total = 0.0
    for wish, must in criteria.wishes():
        terms = _amenity_terms(wish)
        ok = _has(listing, terms) if terms else _mentions(text, wish)
        total += 2 if must else 1
        weight += (2 if must else 1) * ok
    wished = 4 * weight / total if total else 3.0
    price = 1 - 0.5 * listing.price / criteria.max_price if criteria.max_price else 1.0
    near = 1.0
    if criteria.area and near_downtown(criteria.area):
        near = 1.0 if listing.km_to_downtown <= 1 else 0.5
    return round(wished + _FIT_POINTS[fit.fit] + _REVIEW_POINTS[fit.reviews] + price + near)


def rank(criteria: Criteria, finalists: list[Finalist], scores: list[Fit | None]) -> list[Ranked]:
    ranked = [
        Ranked(
            listing_id=f.listing.id,
            title=f.listing.title,
            price=f.listing.price,
            bedrooms=f.listing.bedrooms,
            km_to_downtown=f.listing.km_to_downtown,
            rating=f.listing.rating,
            score=points(criteria, f, s),
            reason=s.reason,
        )
        for f, s in zip(finalists, scores, strict=True)
        if s is not None
    ]
    ranked.sort(key=lambda r: (-r.score, -(r.rating or 0), r.price))
    return ranked


def briefs(ranked: list[Ranked]) -> list[str]:
    """What the explanation step is given; none when nothing was ranked (no call is made)."""
    if not ranked:
        return []
    return [
        "\n".join(
            f"{i}. {r.title} (${r.price:.0f}/night, {r.bedrooms} bedroom(s), "
            f"{r.km_to_downtown:.1f} km from downtown): {r.score}/10, {r.reason}"
            for i, r in enumerate(ranked[:3], start=1)
        )
    ]


def answer(
    criteria: Criteria, candidates: Candidates, ranked: list[Ranked], explain: list[str | None]
) -> RentalAnswer:
    text = next((e for e in explain if e), None)
    if not ranked:
        text = candidates.note
    return RentalAnswer(
        criteria=criteria,
        ranked=ranked,
        explanation=(text or "").strip(),
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
                output=Criteria,
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
                "has none). fit: how well it fits the request (poor, fair, good or great). "
                "reason: one short sentence on why.",
                max_tokens=80,
            ),
            PythonStep("ranked", rank),
            PythonStep("briefs", briefs),
            ModelStep(
                "explain",
                model=use["rental-explain"],
                inputs=("request", "briefs"),
                map_over="briefs",
                system="You are a helpful rental assistant. Be concise and concrete.",
                prompt="The guest asked: {request}\nTop matches:\n{item}\n\nIn two or three "
                "sentences, recommend the best one and say why, noting any trade-off.",
                max_tokens=110,
                optional=True,
                on_deadline="skip",  # the ranked table is the answer; the prose is a bonus
            ),
            PythonStep("answer", answer, inputs=("criteria", "candidates", "ranked", "explain")),
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
