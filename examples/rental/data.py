"""Inside Airbnb listings and reviews (CC BY 4.0, "Inside Airbnb"), from any city's files in the
standard layout (`listings.csv.gz`, the detailed export, and optionally `reviews.csv.gz`), or
from the two cities of the shared data (`--city albany | jersey-city`).

Distances are measured from the city's center: the one given, a bundled city's downtown, or else
the densest cluster of listings in the file (in most cities, where the visitors stay).
Only what the assistant needs is kept: no host or reviewer names ever leave this module.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
import re
import statistics
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from shoal.errors import ConfigError, DataFileError
from shoal.routing.datasets import shared_data_dir

# The bundled cities: their files' prefix in the shared data's `airbnb/` folder, and downtown.
BUNDLED = {
    "albany": ("albany_ny", (42.6506, -73.7545), "downtown Albany"),
    "jersey-city": ("jersey_city_nj", (40.7163, -74.0381), "downtown Jersey City"),
}
DATA_DIR_HELP = (
    "set SHOAL_DATA_DIR to the folder that holds airbnb/{file}, or give a city's listings file "
    "itself with --listings FILE (Inside Airbnb's listings.csv.gz)"
)
# The columns the assistant reads; the others it may use when present.
LISTING_COLUMNS = (
    "id",
    "name",
    "description",
    "neighbourhood_cleansed",
    "latitude",
    "longitude",
    "room_type",
    "accommodates",
    "amenities",
    "price",
    "number_of_reviews",
    "review_scores_rating",
)
REVIEW_COLUMNS = ("listing_id", "comments")
CLUSTER_KM = 1.0  # the size of the grid cells the densest cluster is looked for in


class Listing(BaseModel):
    id: int
    title: str
    description: str
    area: str  # what the listing says of its neighbourhood
    neighbourhood: str
    property_type: str
    room_type: str
    accommodates: int
    bedrooms: int
    bathrooms: str
    price: float
    amenities: list[str]
    rating: float | None
    reviews: int
    km_to_center: float

    def summary(self) -> str:
        amenities = ", ".join(self.amenities[:8])
        return (
            f"{self.title} | {self.room_type}, {self.bedrooms} bedroom(s), sleeps "
            f"{self.accommodates}, ${self.price:.0f}/night, {self.km_to_center:.1f} km from the "
            f"center, in {self.neighbourhood} | {self.description[:150]} | amenities: {amenities}"
        )

    def text(self) -> str:
        """Everything the listing says in words: where place and other wishes are looked for."""
        return " ".join(
            [self.title, self.description, self.area, self.neighbourhood, self.property_type]
        )


class City(BaseModel):
    """Where the listings come from: an Inside Airbnb listings file, its reviews file (if any),
    and the point distances are measured from (`None`: the densest cluster of listings)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    listings: Path
    reviews: Path | None = None
    center: tuple[float, float] | None = None
    center_name: str | None = None

    @field_validator("center")
    @classmethod
    def _on_earth(cls, center: tuple[float, float] | None) -> tuple[float, float] | None:
        if center is not None and not _on_earth(*center):
            raise ValueError(f"{center[0]},{center[1]} is not a latitude,longitude")
        return center


def _on_earth(lat: float, lon: float) -> bool:
    return -90 <= lat <= 90 and -180 <= lon <= 180


class Market(BaseModel):
    """A city's listings as loaded: those with a price, where distances are measured from and
    why, and the rows left out."""

    city: City
    listings: tuple[Listing, ...]
    center: tuple[float, float]
    center_from: str
    rows: int
    without_price: int
    without_place: int

    def describe(self) -> str:
        """One line for the guest: how many listings, what was skipped, where the center is."""
        skipped = [
            f"{n} row(s) without {what} skipped"
            for n, what in ((self.without_price, "a price"), (self.without_place, "coordinates"))
            if n
        ]
        lat, lon = self.center
        return (
            f"{len(self.listings)} listings in {self.city.name}"
            + (f" ({'; '.join(skipped)})" if skipped else "")
            + f"; km measured from {lat:.4f},{lon:.4f}, {self.center_from}"
        )


def parse_center(text: str) -> tuple[float, float]:
    """`LAT,LON` as given on the command line."""
    try:
        lat, lon = (float(part) for part in text.split(","))
    except ValueError:
        lat = lon = math.nan
    if not _on_earth(lat, lon):  # false for nan too
        raise ConfigError(
            f"--center {text!r}: write it as LAT,LON in degrees, e.g. 40.7178,-74.0431"
        )
    return lat, lon


def bundled(name: str) -> City:
    """A city of the shared data; `DataFileError` says how to point at the data when it is not
    found (`SHOAL_DATA_DIR`, or the files themselves)."""
    try:
        prefix, downtown, label = BUNDLED[name]
    except KeyError:
        raise ConfigError(
            f"unknown city {name!r}; valid: {', '.join(BUNDLED)} (or give --listings FILE)"
        ) from None
    wanted = f"{prefix}_listings.csv.gz"
    try:
        folder = shared_data_dir() / "airbnb"
    except ConfigError:
        raise DataFileError(
            f"cannot find the shared data folder for --city {name}: "
            + DATA_DIR_HELP.format(file=wanted)
        ) from None
    if not (folder / wanted).is_file():
        raise DataFileError(
            f"no {wanted} in {folder} for --city {name}: " + DATA_DIR_HELP.format(file=wanted)
        )
    reviews = folder / f"{prefix}_reviews.csv.gz"
    return City(
        name=name.replace("-", " ").title(),
        listings=folder / wanted,
        reviews=reviews if reviews.is_file() else None,
        center=downtown,
        center_name=label,
    )


def city_of(city: str | Mapping[str, Any] | City) -> City:
    """The pipeline's `city` input: a bundled city's name, a listings file's path, or the fields
    of a `City` (`{"listings": PATH, "reviews": PATH, "center": [LAT, LON]}`)."""
    if isinstance(city, City):
        return city
    if isinstance(city, str):
        if city in BUNDLED:
            return bundled(city)
        if city.endswith((".csv", ".csv.gz")) or Path(city).is_file():
            return from_file(Path(city))
        return bundled(city)  # an unknown name: the error lists the valid ones
    fields = dict(city)
    if "listings" in fields:
        fields.setdefault("name", _name_of(Path(str(fields["listings"]))))
    try:
        return City.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'city'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"city {fields!r}: {problems}") from None


def from_file(listings: Path) -> City:
    """A city given as its listings file, named after it."""
    return City(name=_name_of(listings), listings=listings)


def _name_of(path: Path) -> str:
    """A readable name for a city given as a file: `listings.csv.gz` in `jersey-city/` is
    "jersey-city"; `paris_listings.csv.gz` is "paris"."""
    stem = re.sub(r"[_-]?listings$", "", path.name.split(".")[0])
    return (stem or path.resolve().parent.name or path.name).replace("_", " ")


@contextmanager
def _rows(path: Path, required: tuple[str, ...], what: str) -> Iterator[csv.DictReader[str]]:
    """A CSV file's rows (gzipped or not, told by its first bytes), after checking that it has
    the `required` columns: `DataFileError` names the missing ones."""
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
    except OSError as exc:
        raise DataFileError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    with (
        gzip.open(path, "rt", encoding="utf-8", newline="")
        if gzipped
        else path.open(encoding="utf-8", newline="") as text
    ):
        try:
            reader = csv.DictReader(text)
            header = reader.fieldnames or []
            if not header:
                raise DataFileError(f"the {what} file {path} is empty")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataFileError(
                    f"{path} is not an Inside Airbnb {what} file: missing column(s) "
                    f"{', '.join(missing)} (it needs {', '.join(required)}"
                    + ("; use the detailed listings.csv.gz" if what == "listings" else "")
                    + ")"
                )
            yield reader
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, csv.Error) as exc:
            raise DataFileError(f"the {what} file {path} is not a CSV text file: {exc}") from None


def _number(text: str | None, default: float) -> float:
    try:
        value = float((text or "").replace("$", "").replace(",", ""))
    except ValueError:
        return default
    return value if math.isfinite(value) else default


def _id(text: str | None) -> int:
    """A listing id: whole digits (ids pass 2**53, so never through a float)."""
    text = (text or "").strip()
    return int(text) if text.isdigit() else 0


_BEDROOMS_IN_TITLE = re.compile(r"(\d+)\s*(?:bedrooms?|br)\b|\b(studio)\b", re.IGNORECASE)


def _bedrooms(row: dict[str, str]) -> int:
    """The bedrooms column; where it is blank (some exports), what the title says, else 0."""
    if (row.get("bedrooms") or "").strip():
        return int(_number(row["bedrooms"], 0))
    found = _BEDROOMS_IN_TITLE.search(row.get("name") or "")
    return int(found.group(1)) if found and found.group(1) else 0


def _km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371 * math.asin(math.sqrt(h))


def densest(points: list[tuple[float, float]]) -> tuple[float, float]:
    """The middle of the densest cluster: the grid cell of about `CLUSTER_KM` whose block of
    3 x 3 cells holds the most points, and the median of the points in that block."""
    lat0 = statistics.median(p[0] for p in points)
    step_lat = CLUSTER_KM / 111.2
    step_lon = step_lat / max(math.cos(math.radians(lat0)), 0.01)
    cells: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        cells[(math.floor(p[0] / step_lat), math.floor(p[1] / step_lon))].append(p)

    def block(cell: tuple[int, int]) -> list[tuple[float, float]]:
        i, j = cell
        return [
            p for di in (-1, 0, 1) for dj in (-1, 0, 1) for p in cells.get((i + di, j + dj), ())
        ]

    best = max(sorted(cells), key=lambda cell: len(block(cell)))
    near = block(best)
    return (
        round(statistics.median(p[0] for p in near), 4),
        round(statistics.median(p[1] for p in near), 4),
    )


@cache
def market(city: City) -> Market:
    """A city's listings with a price, cleaned; cached per process."""
    rows = without_price = without_place = 0
    kept: list[tuple[dict[str, str], float, tuple[float, float]]] = []
    with _rows(city.listings, LISTING_COLUMNS, "listings") as reader:
        for row in reader:
            rows += 1
            price = _number(row["price"], 0.0)
            lat, lon = _number(row["latitude"], math.nan), _number(row["longitude"], math.nan)
            if price <= 0:
                without_price += 1
            elif math.isnan(lat) or math.isnan(lon):
                without_place += 1
            else:
                kept.append((row, price, (lat, lon)))
    if not kept:
        raise DataFileError(
            f"the listings file {city.listings} has no listing with a price and coordinates "
            f"({rows} row(s): {without_price} without a price, {without_place} without "
            "coordinates)"
        )
    if city.center is not None:
        center = city.center
        center_from = city.center_name or "the center given"
    else:
        center = densest([place for _, _, place in kept])
        center_from = "the densest cluster of listings in the file (--center LAT,LON to choose)"
    listings = tuple(_listing(row, price, _km(center, place)) for row, price, place in kept)
    return Market(
        city=city,
        listings=listings,
        center=center,
        center_from=center_from,
        rows=rows,
        without_price=without_price,
        without_place=without_place,
    )


def _clean(text: str | None) -> str:
    return " ".join(re.sub(r"<br\s*/?>", " ", text or "").split())


def _listing(row: dict[str, str], price: float, km: float) -> Listing:
    try:
        amenities = [str(a) for a in json.loads(row["amenities"] or "[]")]
    except (json.JSONDecodeError, TypeError):
        amenities = []
    rating = _number(row["review_scores_rating"], -1.0)
    return Listing(
        id=_id(row["id"]),
        title=_clean(row["name"]),
        description=_clean(row["description"]),
        area=_clean(row.get("neighborhood_overview")),
        neighbourhood=(row["neighbourhood_cleansed"] or "").split(" (")[0].title(),
        property_type=row.get("property_type") or "",
        room_type=row["room_type"] or "",
        accommodates=max(1, int(_number(row["accommodates"], 1))),
        bedrooms=_bedrooms(row),
        bathrooms=row.get("bathrooms_text") or "",
        price=price,
        amenities=amenities,
        rating=rating if rating >= 0 else None,
        reviews=int(_number(row["number_of_reviews"], 0)),
        km_to_center=round(km, 2),
    )


def load_listings(city: str | Mapping[str, Any] | City) -> tuple[Listing, ...]:
    return market(city_of(city)).listings


@cache
def _reviews(path: Path) -> dict[int, list[str]]:
    by_listing: dict[int, list[str]] = defaultdict(list)
    with _rows(path, REVIEW_COLUMNS, "reviews") as reader:
        for row in reader:  # the reviewer's name column is never read
            text = _clean(row["comments"])
            if len(text) > 40:
                by_listing[_id(row["listing_id"])].append(text)
    return by_listing


def review_sample(
    city: str | Mapping[str, Any] | City, listing_id: int, *, k: int = 3, chars: int = 240
) -> list[str]:
    """Up to `k` reviews of a listing (a fixed sample, so runs are repeatable); none when the
    city has no reviews file."""
    path = city_of(city).reviews
    reviews = _reviews(path).get(listing_id, []) if path is not None else []
    picked = random.Random(listing_id).sample(reviews, min(k, len(reviews)))
    return [r[:chars] for r in picked]
