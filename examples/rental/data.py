"""Inside Airbnb listings and reviews (CC BY 4.0, "Inside Airbnb"), read from the shared data.

Only what the assistant needs is kept: no host or reviewer names ever leave this module.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from collections import defaultdict
from functools import cache
from pathlib import Path

from pydantic import BaseModel

from shoal.errors import ConfigError
from shoal.routing.datasets import shared_data_dir

CITIES = {
    # file prefix, and the downtown point distances are measured from
    "albany": ("albany_ny", (42.6506, -73.7545)),
    "jersey-city": ("jersey_city_nj", (40.7163, -74.0381)),
}


class Listing(BaseModel):
    id: int
    title: str
    description: str
    neighbourhood: str
    room_type: str
    accommodates: int
    bedrooms: int
    bathrooms: str
    price: float
    amenities: list[str]
    rating: float | None
    reviews: int
    km_to_downtown: float

    def summary(self) -> str:
        amenities = ", ".join(self.amenities[:8])
        return (
            f"{self.title} | {self.room_type}, {self.bedrooms} bedroom(s), sleeps "
            f"{self.accommodates}, ${self.price:.0f}/night, {self.km_to_downtown:.1f} km from "
            f"downtown | {self.description[:150]} | amenities: {amenities}"
        )


def data_dir() -> Path:
    """The Inside Airbnb folder of the shared data (`$SHOAL_DATA_DIR`, else found above here)."""
    return shared_data_dir() / "airbnb"


def _km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371 * math.asin(math.sqrt(h))


def _city(city: str) -> tuple[str, tuple[float, float]]:
    try:
        return CITIES[city]
    except KeyError:
        raise ConfigError(f"unknown city {city!r}; valid: {', '.join(CITIES)}") from None


def _number(text: str, default: float = 0.0) -> float:
    try:
        return float(text.replace("$", "").replace(",", ""))
    except ValueError:
        return default


@cache
def load_listings(city: str) -> tuple[Listing, ...]:
    """Listings with a price, cleaned; cached per process."""
    prefix, downtown = _city(city)
    path = data_dir() / f"{prefix}_listings.csv.gz"
    listings = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            price = _number(row["price"])
            if price <= 0:
                continue
            try:
                amenities = [str(a) for a in json.loads(row["amenities"] or "[]")]
            except json.JSONDecodeError:
                amenities = []
            rating = _number(row["review_scores_rating"], -1.0)
            listings.append(
                Listing(
                    id=int(row["id"]),
                    title=row["name"].strip(),
                    description=" ".join(row["description"].replace("<br />", " ").split()),
                    neighbourhood=row["neighbourhood_cleansed"].split(" (")[0].title(),
                    room_type=row["room_type"],
                    accommodates=int(_number(row["accommodates"], 1)),
                    bedrooms=int(_number(row["bedrooms"], 0)),
                    bathrooms=row["bathrooms_text"],
                    price=price,
                    amenities=amenities,
                    rating=rating if rating >= 0 else None,
                    reviews=int(_number(row["number_of_reviews"])),
                    km_to_downtown=round(
                        _km(downtown, (float(row["latitude"]), float(row["longitude"]))), 2
                    ),
                )
            )
    return tuple(listings)


@cache
def _reviews(city: str) -> dict[int, list[str]]:
    prefix, _ = _city(city)
    path = data_dir() / f"{prefix}_reviews.csv.gz"
    by_listing: dict[int, list[str]] = defaultdict(list)
    if not path.is_file():
        return by_listing
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):  # the reviewer's name column is never read
            text = " ".join(row["comments"].replace("<br/>", " ").split())
            if len(text) > 40:
                by_listing[int(row["listing_id"])].append(text)
    return by_listing


def review_sample(city: str, listing_id: int, *, k: int = 3, chars: int = 240) -> list[str]:
    """Up to `k` reviews of a listing (a fixed sample, so runs are repeatable)."""
    reviews = _reviews(city).get(listing_id, [])
    picked = random.Random(listing_id).sample(reviews, min(k, len(reviews)))
    return [r[:chars] for r in picked]
