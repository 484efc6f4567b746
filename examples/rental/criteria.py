"""What the guest asked for, and a check that every criterion a model read is in the request.

Models invent: asked for "a place for 12 people under $40", even the large one answered with 4
bedrooms, wifi, parking and a balcony. The filters would then drop listings the guest never
ruled out. `ground` keeps a number only where the request states it, and a wish only where one of
its words is in the request; numbers and a place ("near the station") the request states plainly
and the model missed are put back, and the room type is read from the request's own words.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

CRITERIA_SYSTEM = """You turn a rental request into search criteria, as JSON.
max_price: the nightly budget in dollars ("under $150" -> 150), else null.
guests: how many people, else null. bedrooms: how many bedrooms ("studio" -> 0), else null.
area: where ("downtown", a neighbourhood), else null.
must_haves: amenities the guest requires (one or two words each, e.g. "parking", "wifi").
nice_to_haves: things the guest would like but does not require (e.g. "quiet", "balcony").
Example. Request: "a cheap studio for 2 near downtown with wifi, ideally quiet"
{"max_price": null, "guests": 2, "bedrooms": 0, "area": "downtown", "must_haves": ["wifi"],
 "nice_to_haves": ["quiet"]}"""


class Reading(BaseModel):
    """What the model reads in the request, as fields a filter can use."""

    # Every field is required, so constrained output must state each one (null when unsaid).
    max_price: float | None = Field(description="nightly budget in USD")
    guests: int | None
    bedrooms: int | None
    area: str | None = Field(description="e.g. downtown, or a neighbourhood")
    must_haves: list[str]
    nice_to_haves: list[str]

    def wishes(self) -> list[tuple[str, bool]]:
        """Every wish with whether it is required; the area too ("near the university", "whole
        house"), unless it is downtown, which the filters measure."""
        wishes = [(w, True) for w in self.must_haves] + [(w, False) for w in self.nice_to_haves]
        if self.area and not near_downtown(self.area):
            wishes.append((self.area, False))
        kept: dict[str, tuple[str, bool]] = {}
        for wish, must in wishes:
            # Not the budget again ("under $110"), nor who is coming ("family": the guests
            # count says it), nor a wish twice.
            party = set(re.findall(r"[a-z]+", wish.lower())) <= _PARTY
            if not re.search(r"[\d$]", wish) and not party and wish.lower() not in kept:
                kept[wish.lower()] = (wish, must)
        return list(kept.values())


# Words that say who is coming, not what they wish for.
_PARTY = {"a", "the", "my", "our", "family", "couple", "group", "friends", "kids", "children"}
_PARTY |= {"people", "guests", "adults", "party", "of", "with", "for", "big", "small", "large"}

# Inside Airbnb's room types, by the first word of each ("Entire home/apt", "Private room", ...).
RoomType = Literal["entire", "private", "shared", "hotel"]


class Criteria(Reading):
    """The reading grounded in the request's words, with the room type the words state."""

    room_type: RoomType | None = None

    def room_label(self) -> str | None:
        return {
            "entire": "a whole place",
            "private": "a private room",
            "shared": "a shared room",
            "hotel": "a hotel room",
        }.get(self.room_type or "")


_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()  # noqa: SIM905
_NUMBER = r"(\d+|" + "|".join(_WORDS) + r")"
_BEDROOMS = re.compile(_NUMBER + r"[\s-]*(?:bedrooms?|beds?|br)\b")
_GUESTS = re.compile(
    _NUMBER + r"\s+(?:guests?|people|persons?|adults?)\b"
    r"|(?:family|group|party) of\s+"
    + _NUMBER
    # "for 2" and "for two, ..." but not "for 3 cars" or "for 2 nights"
    + r"|\bfor\s+"
    + _NUMBER
    + r"(?=\s*(?:$|[,.;!?]|(?:with|and|near|in|under|on|at)\b))"
)
_PRICE = re.compile(
    r"\$\s*(\d+)|(?:under|below|up to|budget(?: of)?|max(?:imum)?|around|less than|at most)\s+(\d+)"
)
# "near the train station", "close to downtown restaurants", "walkable to downtown for ..."
_PLACE = re.compile(
    r"\b(?:near|close to|next to|walking distance (?:to|of|from)|walkable to|steps from"
    r"|minutes from)\s+(?:the\s+|a\s+)?([a-z][a-z ]*?)"
    r"(?=\s*(?:[,.;!?]|$|\b(?:with|under|for|and|but|in|on|at)\b))"
)
_DOWNTOWN = ("downtown", "city centre", "city center", "centre", "center")
# Words that tell nothing about a wish ("not" and "without" too: "no stairs" is about stairs).
_STOP = {"and", "the", "for", "with", "near", "close", "some", "very", "free", "good", "nice"}
_STOP |= {"not", "without"}


def near_downtown(area: str) -> bool:
    return any(word in area.lower() for word in _DOWNTOWN)


def _number(word: str) -> int:
    return int(word) if word.isdigit() else _WORDS.index(word)


def _found(pattern: re.Pattern[str], text: str) -> list[int]:
    return [_number(g) for m in pattern.finditer(text) for g in m.groups() if g]


def stems(phrase: str) -> list[str]:
    """The stems of a phrase's telling words: "luxurious" and "luxury" share "luxu"."""
    words = re.findall(r"[a-z]+", phrase.lower())
    return [w[: max(4, len(w) - 3)] for w in words if len(w) >= 3 and w not in _STOP]


def _stated(wish: str, text: str) -> bool:
    """A wish is stated when one of its words (or the word's stem) is in the request."""
    return any(stem in text for stem in stems(wish))


# What a request says about the room, most specific first: "a room in a house" is a room.
_ROOMS: tuple[tuple[RoomType, re.Pattern[str]], ...] = (
    ("shared", re.compile(r"\bshared room\b|\bhostel\b|\bbunk|\bdorm")),
    ("private", re.compile(r"\b(?:private|own|spare|guest) room\b|\broom (?:in|at|with)\b")),
    ("hotel", re.compile(r"\bhotel\b")),
    (
        "entire",
        re.compile(
            r"\b(?:whole|entire)\b|place to (?:ourselves|myself|ourself)|\bown place\b"
            r"|\b(?:house|home|apartment|apt|condo|loft|flat|cottage|cabin|villa|townhouse"
            r"|bungalow)s?\b"
        ),
    ),
)


def room_type(request: str) -> RoomType | None:
    """The room type a request states ("a whole apartment", "a private room"), if any."""
    text = re.sub(r"\b(?:from|at|like) home\b", "", request.lower())  # "work from home"
    return next((kind for kind, words in _ROOMS if words.search(text)), None)


def ground(request: str, criteria: Reading) -> Criteria:
    """The criteria with what the request does not say removed, and plain numbers put back."""
    text = request.lower()
    prices = [float(p) for p in _found(_PRICE, text)]
    guests, bedrooms = _found(_GUESTS, text), _found(_BEDROOMS, text)
    if "studio" in text:
        bedrooms.append(0)
    if not guests and re.search(r"\bcouple\b", text):
        guests = [2]
    if not guests and re.search(r"\b(?:one person|solo|alone)\b", text):
        guests = [1]
    price = criteria.max_price if criteria.max_price in prices else None
    area = criteria.area if criteria.area and _stated(criteria.area, text) else None
    if area is None and (place := _PLACE.search(text)):
        area = place.group(1)  # a place the request names plainly and the model missed
    return Criteria(
        max_price=price if price is not None else (prices[0] if prices else None),
        guests=criteria.guests if criteria.guests in guests else (guests[0] if guests else None),
        bedrooms=(
            criteria.bedrooms
            if criteria.bedrooms in bedrooms
            else (bedrooms[0] if bedrooms else None)
        ),
        area=area,
        must_haves=[w for w in criteria.must_haves if _stated(w, text)],
        nice_to_haves=[w for w in criteria.nice_to_haves if _stated(w, text)],
        room_type=room_type(request),
    )
