"""The written recommendation, checked against the ranking before a guest reads it.

The pick is computed; the prose only says why. A model's text is kept when, once any loop is cut
out of it, it names the ranked #1 before any other listing, every number in it is one of the
facts it was given (or the request's), and its comparative claims ("cheapest", "highest rated",
"perfect", an average) hold of the listings given; else the recommendation is written from the
facts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_STOP = {"the", "and", "with", "for", "near", "from", "in", "of", "to", "a", "an", "w"}
MAX_SENTENCES = 4
LOOP_WORDS = 5  # a run of this many words said twice in one sentence is a loop


class Ranked(Protocol):
    """What the checks read of a ranked listing."""

    title: str
    price: float
    bedrooms: int
    accommodates: int
    km_to_center: float
    rating: float | None
    reviews: int
    score: float
    reason: str


def _key(sentence: str) -> str:
    return " ".join(_WORD.findall(sentence.lower()))


def _loops(sentence: str) -> bool:
    words = _WORD.findall(sentence.lower())
    runs = [tuple(words[i : i + LOOP_WORDS]) for i in range(len(words) - LOOP_WORDS + 1)]
    return len(runs) != len(set(runs))


def unloop(text: str) -> str:
    """`text` up to its first repeated sentence (or a sentence that repeats itself), without a
    sentence left unfinished, at most `MAX_SENTENCES` sentences."""
    kept: list[str] = []
    seen: set[str] = set()
    for sentence in _SENTENCE.split(" ".join(text.split())):
        key = _key(sentence)
        if not key:
            continue
        if key in seen or _loops(sentence) or len(kept) == MAX_SENTENCES:
            break
        seen.add(key)
        kept.append(sentence)
    if kept and not kept[-1].rstrip("\"')").endswith((".", "!", "?")):
        kept.pop()  # cut off mid-sentence (max_tokens)
    return " ".join(kept)


def _telling(title: str) -> list[str]:
    return [w for w in _WORD.findall(title.lower()) if len(w) >= 3 and w not in _STOP]


def first_named(text: str, titles: Sequence[str]) -> int | None:
    """The index of the title that `text` names first, or None when it names none. A title is
    named where at least half of its telling words (those no other title has, when it has
    any) are in the text; its place is the first of them."""
    words = _WORD.findall(text.lower())
    where: dict[int, int] = {}
    for i, title in enumerate(titles):
        own = _telling(title)
        others = {w for j, t in enumerate(titles) if j != i for w in _telling(t)}
        distinct = [w for w in own if w not in others] or own
        found = [words.index(w) for w in distinct if w in words]
        if distinct and len(found) * 2 >= len(distinct):
            where[i] = min(found)
    return min(where, key=lambda i: where[i]) if where else None


def _numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in _NUMBER.findall(text)]


def numbers_checked(text: str, facts: str) -> bool:
    """Whether every number in `text` is one in `facts` (rounding allowed), or a rank (1-3)."""
    known = [*_numbers(facts), 1.0, 2.0, 3.0]
    return all(any(abs(n - k) <= max(0.05, 0.01 * k) for k in known) for n in _numbers(text))


# Words that claim what nothing given to the model says (an average), and the claims the facts
# settle: each must hold of the ranked #1 among the listings given.
_UNGROUNDED = re.compile(r"\b(?:average|median|typical|most popular)\b")
_CHEAPEST = re.compile(r"\b(?:cheapest|least expensive|lowest[- ]price[ds]?)\b")
_BEST_RATED = re.compile(r"\b(?:highest|best|top)[- ]rated\b|\bhighest rating\b")
_PERFECT = re.compile(r"\bperfect\b")


def claims_hold(text: str, ranked: Sequence[Ranked]) -> bool:
    """Whether the text's comparative claims are true of the listings given: no average (none
    was given), "cheapest" and "highest rated" only of #1 when it is, a "perfect" score only of
    a 10 and a "perfect" rating only of a 5.00."""
    said = text.lower()
    shown = ranked[:3]
    best = shown[0]
    if _UNGROUNDED.search(said):
        return False
    if _CHEAPEST.search(said) and best.price > min(r.price for r in shown):
        return False
    if _BEST_RATED.search(said) and (best.rating or 0) < max(r.rating or 0 for r in shown):
        return False
    for sentence in _SENTENCE.split(said):  # "a perfect score" only of a 10, "perfect rating" of 5
        if not _PERFECT.search(sentence):
            continue
        if "score" in sentence and best.score < 10:
            return False
        if re.search(r"\brat(?:ing|ed)\b", sentence) and best.rating != 5.0:
            return False
    return True


def checked(text: str | None, ranked: Sequence[Ranked], facts: str) -> str | None:
    """The model's recommendation, loops cut out, when it names #1 first, states no number the
    `facts` (what it was given) do not, and makes no comparative claim they do not bear out;
    else None."""
    if not text or not ranked:
        return None
    tidy = unloop(text)
    titles = [r.title for r in ranked[:3]]
    if not tidy or first_named(tidy, titles) != 0:
        return None
    return tidy if numbers_checked(tidy, facts) and claims_hold(tidy, ranked) else None


def written(ranked: Sequence[Ranked]) -> str:
    """The recommendation written from the facts of the ranking."""
    best = ranked[0]
    text = (
        f'"{best.title}" is the best match ({best.score:.1f}/10): ${best.price:.0f}/night, '
        f"{best.bedrooms} bedroom(s), sleeps {best.accommodates}, {best.km_to_center:.1f} km "
        f"from the center; {best.reason}."
    )
    if len(ranked) > 1:
        runner = ranked[1]
        than = (
            "cheaper"
            if runner.price < best.price
            else "dearer"
            if runner.price > best.price
            else "the same price"
        )
        text += (
            f' Next: "{runner.title}" ({runner.score:.1f}/10), ${runner.price:.0f}/night, {than}.'
        )

    return text
