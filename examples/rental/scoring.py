"""A finalist's score out of ten, and the reasons for it, from facts a guest can check.

The scorer model gives two verdicts in words (what the reviews say, how well the listing fits);
everything else comes from the listing itself: which wishes its amenities, title, description,
neighbourhood or reviews bear out (and where), its rating, its price against the budget, its
distance from the center when downtown was asked for, and its bedrooms against the party.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel

from shoal_examples.rental.criteria import Criteria, near_downtown, stems
from shoal_examples.rental.data import Listing

# Amenity words a filter can check; anything else is looked for in the listing's words.
AMENITY_WORDS = {
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
# Places a listing's words name in more than one way.
PLACE_WORDS = {
    ("train", "station", "subway", "metro", "rail", "transit", "ferry"): (
        "train",
        "station",
        "subway",
        "metro",
        "rail",
        "light rail",
        "transit",
        "ferry",
    ),
    ("university", "college", "campus"): ("university", "college", "campus"),
    ("beach", "ocean", "sea", "shore"): ("beach", "ocean", "shore", "seaside"),
    ("restaurant", "restaurants", "dining", "food"): ("restaurant", "dining", "cafe", "bistro"),
    ("nightlife", "bars", "bar"): ("nightlife", "bar", "club", "pub"),
    ("hospital", "medical"): ("hospital", "medical center"),
    ("airport",): ("airport",),
    ("park",): ("park",),
}

FIT_POINTS = {"poor": 0.0, "fair": 0.7, "good": 1.3, "great": 2.0}
REVIEW_POINTS = {"positive": 2.0, "mixed": 1.0, "none": 1.0, "negative": 0.0}
NEAR_KM = 1.0


class Fit(BaseModel):
    """The scorer's reading of one listing: what its reviews say, and how well it fits. The
    score is computed from these and the listing's facts (`assess`), not asked for: the models'
    numbers out of ten were noise, while a verdict in words is something a small model gives
    about as well as a large one."""

    reviews: Literal["positive", "mixed", "negative", "none"]
    fit: Literal["poor", "fair", "good", "great"]


class Assessment(BaseModel):
    score: float  # 0-10, one decimal
    wishes: float  # the share of the wishes met, required ones counting double (1 when none)
    reason: str  # facts of the listing, each checkable


def amenity_terms(wish: str) -> tuple[str, ...] | None:
    wish = wish.lower()
    for word, terms in AMENITY_WORDS.items():
        if re.search(rf"\b{re.escape(word)}\b", wish):
            return terms
    return None


def has(listing: Listing, terms: tuple[str, ...]) -> bool:
    return any(any(t in a.lower() for t in terms) for a in listing.amenities)


def _place_terms(wish: str) -> tuple[str, ...] | None:
    words = set(re.findall(r"[a-z]+", wish.lower()))
    for keys, terms in PLACE_WORDS.items():
        if words & set(keys):
            return terms
    return None


def _says(text: str, terms: tuple[str, ...], *, whole: bool) -> bool:
    """Whether `text` has one of `terms`: as whole words (a plural too), or as word starts."""
    tail = r"(?:s|es)?\b" if whole else ""
    return any(re.search(rf"\b{re.escape(t)}{tail}", text) for t in terms)


def evidence(listing: Listing, reviews: list[str], wish: str) -> str | None:
    """Where the listing bears a wish out: "amenities", "title", "description", "about the
    area", "neighbourhood" or "reviews"; None when nowhere. For "no stairs", the listing bears
    it out when none of its words mention stairs."""
    terms = amenity_terms(wish)
    if terms is not None:
        return "amenities" if has(listing, terms) else None
    negated = wish.lower().startswith(("no ", "not ", "without "))
    place = _place_terms(wish)
    words = place or tuple(stems(wish))
    if not words:
        return None
    sources = {
        "title": listing.title,
        "description": listing.description,
        "about the area": listing.area,
        "neighbourhood": listing.neighbourhood,
        "reviews": " ".join(reviews),
    }
    found = next(
        (k for k, v in sources.items() if _says(v.lower(), words, whole=bool(place))), None
    )
    if negated:
        return None if found else "not mentioned"
    return found


# A rating over few reviews says less: it is pulled toward a typical one, as if it had
# `PRIOR_REVIEWS` more reviews rating `PRIOR_RATING`.
PRIOR_RATING, PRIOR_REVIEWS = 4.5, 3


def rating_points(listing: Listing) -> float | None:
    """0-2 from the rating out of 5 (4.0 or lower gives 0, 5.0 gives 2), pulled toward a
    typical rating when it rests on few reviews."""
    if listing.rating is None:
        return None
    n = max(listing.reviews, 1)
    rating = (listing.rating * n + PRIOR_RATING * PRIOR_REVIEWS) / (n + PRIOR_REVIEWS)
    return float(min(2.0, max(0.0, (rating - 4.0) * 2)))


class Wishes(BaseModel):
    share: float  # of the wishes met, required ones counting double (1 when none was stated)
    met: list[str]  # "wish (where)"
    missing: list[str]
    stated: bool


def wishes_met(criteria: Criteria, listing: Listing, reviews: list[str]) -> Wishes:
    met, missing = [], []
    weight = total = 0.0
    for wish, must in criteria.wishes():
        where = evidence(listing, reviews, wish)
        total += 2 if must else 1
        if where:
            weight += 2 if must else 1
            met.append(f"{wish} ({where})")
        else:
            missing.append(wish)
    share = weight / total if total else 1.0
    return Wishes(share=share, met=met, missing=missing, stated=bool(total))


def assess(criteria: Criteria, listing: Listing, reviews: list[str], fit: Fit) -> Assessment:
    """The 0-10 score and its reasons. 4 for the wishes met (required ones count double; 3 when
    none was stated), 2 for the scorer's fit, 2 for the reviews (the scorer's verdict on those
    shown, and the rating, averaged when both are known), 1 for the price against the budget, 1
    for the place and the space (the distance when downtown was asked for; bedrooms for the
    party when its size was stated and the bedrooms were not)."""
    wished = wishes_met(criteria, listing, reviews)
    said = [REVIEW_POINTS[fit.reviews]] if reviews else []
    rated = rating_points(listing)
    heard = [*said, *([rated] if rated is not None else [])]
    review_points = sum(heard) / len(heard) if heard else 1.0
    price = 1 - 0.5 * listing.price / criteria.max_price if criteria.max_price else 1.0
    place: list[float] = []
    if criteria.area and near_downtown(criteria.area):
        place.append(1.0 if listing.km_to_center <= NEAR_KM else 0.5)
    guests = criteria.guests or 0
    if guests >= 3 and criteria.bedrooms is None and criteria.room_type in (None, "entire"):
        place.append(min(1.0, 2 * listing.bedrooms / guests))
    space = sum(place) / len(place) if place else 1.0
    score = (
        (4 * wished.share if wished.stated else 3.0)
        + FIT_POINTS[fit.fit]
        + review_points
        + max(0.0, price)
        + space
    )
    return Assessment(
        score=round(score, 1), wishes=wished.share, reason=_reason(listing, reviews, fit, wished)
    )


def _reason(listing: Listing, reviews: list[str], fit: Fit, wished: Wishes) -> str:
    """The facts behind a score, each one a guest can check on the listing."""
    parts = []
    if wished.met:
        parts.append("matches " + ", ".join(wished.met))
    if wished.missing:
        parts.append("no sign of " + ", ".join(wished.missing))
    if listing.rating is not None:
        parts.append(f"rated {listing.rating:.2f}/5 over {listing.reviews} review(s)")
    else:
        parts.append("not rated yet")
    if reviews:
        parts.append(f"{len(reviews)} review(s) read as {fit.reviews}")
    parts.append(f"fit read as {fit.fit}")
    return "; ".join(parts)
