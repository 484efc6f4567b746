"""A quality figure that depends on no model: how many of the listings shown meet what the
request states as hard constraints, as a person reads them (written down per request, not
read by a model): the price within the stated maximum, bedrooms and guests at least as asked,
the room type stated, and each stated must-have present in the amenities or the listing's words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict

from shoal_examples.rental.criteria import RoomType
from shoal_examples.rental.data import Listing


class Stated(BaseModel):
    """A request's hard constraints. A must-have is the words any one of which shows it
    (`("washer", "laundry")`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_price: float | None = None
    guests: int | None = None
    bedrooms: int | None = None
    room_type: RoomType | None = None
    must_haves: tuple[tuple[str, ...], ...] = ()


def _present(listing: Listing, words: tuple[str, ...]) -> bool:
    text = " ".join([*listing.amenities, listing.title, listing.description]).lower()
    return any(re.search(rf"\b{re.escape(w.lower())}", text) for w in words)


def unmet(listing: Listing, stated: Stated) -> list[str]:
    """The stated constraints `listing` does not meet (empty: it meets them all)."""
    missed = []
    if stated.max_price is not None and listing.price > stated.max_price:
        missed.append(f"price ${listing.price:.0f} > ${stated.max_price:.0f}")
    if stated.guests is not None and listing.accommodates < stated.guests:
        missed.append(f"sleeps {listing.accommodates} < {stated.guests}")
    if stated.bedrooms is not None and listing.bedrooms < stated.bedrooms:
        missed.append(f"{listing.bedrooms} bedroom(s) < {stated.bedrooms}")
    if stated.room_type is not None and not listing.room_type.lower().startswith(stated.room_type):
        missed.append(f"{listing.room_type}, not {stated.room_type}")
    missed += [f"no {words[0]}" for words in stated.must_haves if not _present(listing, words)]
    return missed


def share_met(
    listing_ids: Iterable[int], listings: Mapping[int, Listing], stated: Stated, *, top: int = 5
) -> float | None:
    """The share of the first `top` listings shown that meet every stated constraint; None when
    none is shown (nothing to judge)."""
    shown = [listings[i] for i in list(listing_ids)[:top]]
    if not shown:
        return None
    return sum(not unmet(x, stated) for x in shown) / len(shown)
