"""The hard filters a request's criteria make, and what to relax when no listing passes them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

from shoal_examples.rental.criteria import Criteria, near_downtown
from shoal_examples.rental.data import Listing
from shoal_examples.rental.scoring import amenity_terms, has

DOWNTOWN_KM = 3.0


@dataclass(frozen=True)
class Filter:
    """One stated constraint: its words, its test, and what the listings that fail only it
    offer instead (`nearest`)."""

    label: str
    test: Callable[[Listing], bool]
    nearest: Callable[[Sequence[Listing]], str] | None = None


def filters(criteria: Criteria) -> list[Filter]:
    """The filters the criteria state, in the order they are applied."""
    found: list[Filter] = []
    if criteria.max_price:
        budget = criteria.max_price
        found.append(
            Filter(
                f"at most ${budget:.0f}/night",
                lambda x: x.price <= budget,
                lambda xs: f"the cheapest ${min(x.price for x in xs):.0f}/night",
            )
        )
    if criteria.guests:
        guests = criteria.guests
        found.append(
            Filter(
                f"sleeps {guests}+",
                lambda x: x.accommodates >= guests,
                lambda xs: f"they sleep up to {max(x.accommodates for x in xs)}",
            )
        )
    if criteria.bedrooms:
        bedrooms = criteria.bedrooms
        found.append(
            Filter(
                f"{bedrooms}+ bedrooms",
                lambda x: x.bedrooms >= bedrooms,
                lambda xs: f"they have up to {max(x.bedrooms for x in xs)} bedroom(s)",
            )
        )
    if criteria.room_type:
        kind = criteria.room_type
        found.append(
            Filter(criteria.room_label() or kind, lambda x: x.room_type.lower().startswith(kind))
        )
    for wish in criteria.must_haves:
        terms = amenity_terms(wish)
        if terms:
            found.append(Filter(f"has {wish}", _having(terms)))
    if criteria.area and near_downtown(criteria.area):
        found.append(
            Filter(
                f"within {DOWNTOWN_KM:g} km of the center",
                lambda x: x.km_to_center <= DOWNTOWN_KM,
                lambda xs: f"the nearest {min(x.km_to_center for x in xs):.1f} km away",
            )
        )
    return found


def _having(terms: tuple[str, ...]) -> Callable[[Listing], bool]:
    return lambda x: has(x, terms)


def passing(listings: Sequence[Listing], tests: Sequence[Filter]) -> list[Listing]:
    return [x for x in listings if all(f.test(x) for f in tests)]


def relax(listings: Sequence[Listing], tests: Sequence[Filter]) -> str:
    """What to ask instead when no listing passes `tests`: each constraint that, dropped
    alone, lets listings through (most first, with what they offer instead); else the best
    pair to drop."""
    stated = ", ".join(f.label for f in tests)
    for size in (1, 2):
        options = []
        for dropped in combinations(tests, size):
            fit = passing(listings, [f for f in tests if f not in dropped])
            if fit:
                options.append((len(fit), dropped, fit))
        if not options:
            continue
        options.sort(key=lambda o: -o[0])
        said = []
        for count, dropped, fit in options[: 3 if size == 1 else 1]:
            hints = [f.nearest(fit) for f in dropped if f.nearest is not None]
            names = " and ".join(f"'{f.label}'" for f in dropped)
            said.append(
                f"without {names}, {count} would fit" + (f" ({'; '.join(hints)})" if hints else "")
            )
        first = " and ".join(f"'{f.label}'" for f in options[0][1])
        return f"No listing fits all of: {stated}. Relax {first}: " + "; ".join(said) + "."
    return f"No listing fits: {stated}, even with any two of these dropped. Ask for less."
