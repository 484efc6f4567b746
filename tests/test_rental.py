"""The rental example: its data, its filters, and its pipeline with stand-in models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shoal import ChatRequest, FunctionModel, TokenPrice
from shoal.engine import Engine
from shoal.fleet import Fleet
from shoal.pipeline.run import Runner
from shoal.pipeline.spec import dump_yaml, load_yaml
from shoal_examples.rental import pipeline as rental
from shoal_examples.rental.data import load_listings, review_sample

PRICE = TokenPrice(input_per_mtok=1.0, output_per_mtok=2.0)


def test_listings_load_clean() -> None:
    listings = load_listings("albany")
    assert len(listings) > 300
    assert all(x.price > 0 and x.km_to_downtown >= 0 for x in listings)
    assert "host_name" not in type(listings[0]).model_fields
    downtown = [x for x in listings if x.km_to_downtown < 1.5]
    assert downtown
    assert len(load_listings("jersey-city")) > 1000


def test_review_samples_are_repeatable() -> None:
    listing = max(load_listings("albany"), key=lambda x: x.reviews)
    first = review_sample("albany", listing.id)
    assert len(first) == 3
    assert first == review_sample("albany", listing.id)


def criteria(**fields: object) -> rental.Criteria:
    base: dict[str, object] = {
        "max_price": None,
        "guests": None,
        "bedrooms": None,
        "area": None,
        "must_haves": [],
        "nice_to_haves": [],
    }
    return rental.Criteria.model_validate(base | fields)


def test_hard_filters_apply_each_criterion() -> None:
    found = rental.candidates(
        criteria(max_price=150, bedrooms=2, area="downtown", must_haves=["parking"]), "albany"
    )
    assert found.listings
    for x in found.listings:
        assert x.price <= 150
        assert x.bedrooms >= 2
        assert x.km_to_downtown <= 3.0
        assert any("parking" in a.lower() or "garage" in a.lower() for a in x.amenities)
    assert "at most $150/night" in found.note


def test_no_listing_fits_says_why() -> None:
    found = rental.candidates(criteria(max_price=20, guests=12), "albany")
    assert found.listings == []
    assert found.note.startswith("No listing fits")
    assert "at most $20/night: 0" in found.note


def stand_ins(criteria_json: dict[str, object]) -> dict[str, FunctionModel]:
    def shortlist(request: ChatRequest) -> str:
        return json.dumps({"picks": [2, 3, 4]})

    def score(request: ChatRequest) -> str:
        price = re.search(r"\$(\d+)/night", request.messages[-1].content)
        return json.dumps({"score": int(price.group(1)) % 11 if price else 0, "reason": "fits"})

    return {
        "rental-criteria": FunctionModel(lambda r: json.dumps(criteria_json), price=PRICE),
        "rental-shortlist": FunctionModel(shortlist, price=PRICE),
        "rental-score": FunctionModel(score, price=PRICE),
        "rental-explain": FunctionModel(lambda r: "Take the first one.", price=PRICE),
    }


async def run_with(tmp_path: Path, models: dict[str, FunctionModel], request: str):  # type: ignore[no-untyped-def]
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    for name, model in models.items():
        engine.add_route(name, model)
    rental.register_routes(engine)  # keeps the stand-ins
    result = await Runner(engine, traces=engine.traces).run(
        rental.build(), {"request": request, "city": "albany"}, budget_usd=1.0
    )
    return engine, result


async def test_the_pipeline_ranks_finalists_with_reasons(tmp_path: Path) -> None:
    models = stand_ins(
        {
            "max_price": 200,
            "guests": 2,
            "bedrooms": 1,
            "area": "downtown",
            "must_haves": ["wifi"],
            "nice_to_haves": ["quiet"],
        }
    )
    engine, result = await run_with(tmp_path, models, "quiet place downtown under $200")
    assert result.status == "ok", result.stop_reason
    answer = result.output
    assert len(answer["ranked"]) == rental.FINALISTS
    scores = [r["score"] for r in answer["ranked"]]
    assert scores == sorted(scores, reverse=True)
    assert answer["explanation"] == "Take the first one."
    # The shortlist's picks come first among the finalists, then the pre-ranking fills up.
    menu = [x["id"] for x in result.values["candidates"]["listings"]]
    finalists = [f["listing"]["id"] for f in result.values["finalists"]]
    assert finalists == [menu[1], menu[2], menu[3], menu[0], menu[4]]
    steps = [c.step for c in engine.traces.calls(result.run_id)]
    assert steps.count("scores") == rental.FINALISTS
    assert steps.count("criteria") == steps.count("shortlist") == steps.count("explain") == 1


async def test_a_request_nothing_fits_gets_an_honest_empty_answer(tmp_path: Path) -> None:
    models = stand_ins(
        {
            "max_price": 15,
            "guests": 14,
            "bedrooms": 7,
            "area": None,
            "must_haves": [],
            "nice_to_haves": [],
        }
    )
    engine, result = await run_with(tmp_path, models, "a mansion for 14 under $15")
    assert result.status == "ok"
    assert result.output["ranked"] == []
    assert result.output["explanation"].startswith("No listing fits")
    # Only the criteria were asked of a model: nothing to shortlist, score or explain.
    assert [c.step for c in engine.traces.calls(result.run_id)] == ["criteria"]


def test_the_pipeline_round_trips_through_yaml() -> None:
    pipeline = rental.build()
    assert load_yaml(dump_yaml(pipeline)).steps == pipeline.steps


def test_all_large_differs_only_in_models() -> None:
    routed, large = rental.build(), rental.all_large()
    assert routed.order == large.order
    models = {s.model for s in large.steps.values() if hasattr(s, "model")}
    assert models == {rental.LARGE}


@pytest.mark.slow
async def test_the_real_fleet_answers_a_request(tmp_path: Path) -> None:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    rental.register_routes(engine)
    result = await Runner(engine, traces=engine.traces).run(
        rental.build(),
        {"request": "2-bedroom near downtown under $150 with parking", "city": "albany"},
        budget_usd=0.05,
    )
    assert result.status in ("ok", "partial"), result.stop_reason
    assert result.output["ranked"]
    await engine.aclose()
