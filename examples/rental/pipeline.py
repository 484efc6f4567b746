"""The rental assistant: criteria -> candidates -> shortlist -> scores -> a ranked answer.

Four model steps, each behind a route, and plain Python for what Python does better (filters,
ranking). The routed pipeline sends each step to the smallest model that does it well; the
`all_large` form sends every step to the large model, the baseline it is measured against.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from shoal.engine import Engine
from shoal.pipeline.graph import ModelStep, Pipeline, PythonStep
from shoal.routing.config import build_route
from shoal.settings import FallbackRouteSpec, FixedRouteSpec
from shoal_examples.rental.data import Listing, load_listings, review_sample

SMALL, LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"

# Which model answers each model step. Reading the request and choosing the finalists decide
# what the guest sees, and happen once per request: the large model (the small one if it fails).
# The fan-out (one score per finalist) and the explanation are where the calls are: the small
# model. (With the shortlist on the small model too, its picks often differed from the large
# model's, and the ranking with them: see bench/README.md.)
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
CRITERIA_SYSTEM = """You turn a rental request into search criteria, as JSON.
max_price: the nightly budget in dollars ("under $150" -> 150), else null.
guests: how many people, else null. bedrooms: how many bedrooms ("studio" -> 0), else null.
area: where ("downtown", a neighbourhood), else null.
must_haves: amenities the guest requires (one or two words each, e.g. "parking", "wifi").
nice_to_haves: things the guest would like but does not require (e.g. "quiet", "balcony").
Example. Request: "a cheap studio for 2 near downtown with wifi, ideally quiet"
{"max_price": null, "guests": 2, "bedrooms": 0, "area": "downtown", "must_haves": ["wifi"],
 "nice_to_haves": ["quiet"]}"""
SHORTLIST_SIZE = 8
FINALISTS = 5


class Criteria(BaseModel):
    """What the user asked for, as fields a filter can use."""

    # Every field is required, so constrained output must state each one (null when unsaid).
    max_price: float | None = Field(description="nightly budget in USD")
    guests: int | None
    bedrooms: int | None
    area: str | None = Field(description="e.g. downtown, or a neighbourhood")
    must_haves: list[str]
    nice_to_haves: list[str]


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
        said = " / ".join(self.reviews) or "no reviews yet"
        rating = f"{self.listing.rating:.2f}" if self.listing.rating else "unrated"
        return f"{self.listing.summary()} | rating {rating} | guests said: {said}"


class Score(BaseModel):
    score: int = Field(ge=0, le=10)
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
    "laundry": ("washer", "dryer", "laundry"),
    "air conditioning": ("air conditioning",),
    "ac": ("air conditioning",),
    "pets": ("pets allowed",),
    "pet": ("pets allowed",),
    "dog": ("pets allowed",),
    "workspace": ("workspace",),
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
            keep(
                f"has {wish}",
                lambda x, t=terms: any(any(w in a.lower() for w in t) for a in x.amenities),
            )
    if criteria.area and "downtown" in criteria.area.lower():
        keep(f"within {_DOWNTOWN_KM:g} km of downtown", lambda x: x.km_to_downtown <= _DOWNTOWN_KM)
    matched = len(pool)
    pool.sort(key=lambda x: (x.km_to_downtown if criteria.area else 0, -(x.rating or 0), x.price))
    note = " -> ".join(steps)
    if not pool:
        note = f"No listing fits: {note}. Loosen the tightest of these and ask again."
    return Candidates(listings=pool[:SHORTLIST_SIZE], matched=matched, note=note)


def menus(candidates: Candidates) -> list[str]:
    """The shortlist prompt's list of candidates; none when nothing fits (no call is made)."""
    if not candidates.listings:
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


def rank(finalists: list[Finalist], scores: list[Score | None]) -> list[Ranked]:
    ranked = [
        Ranked(
            listing_id=f.listing.id,
            title=f.listing.title,
            price=f.listing.price,
            bedrooms=f.listing.bedrooms,
            km_to_downtown=f.listing.km_to_downtown,
            rating=f.listing.rating,
            score=s.score,
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
                "criteria",
                model=use["rental-criteria"],
                output=Criteria,
                inputs=("request",),
                system=CRITERIA_SYSTEM,
                prompt="Request: {request}\nCriteria as JSON:",
                max_tokens=200,
            ),
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
            ),
            PythonStep("finalists", finalists),
            PythonStep("cards", cards),
            ModelStep(
                "scores",
                model=use["rental-score"],
                output=Score,
                inputs=("criteria", "cards"),
                map_over="cards",
                system="You judge how well a rental listing fits a guest's criteria.",
                prompt="Criteria: {criteria}\nListing: {item}\n\nScore the fit from 0 (bad) to 10 "
                "(perfect), with a reason of one short sentence.",
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
