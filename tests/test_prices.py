"""List prices of API models: genai-prices' bundled data first, the dated table as the fallback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from shoal import ConfigError, Fleet, TokenPrice, UnknownModelError
from shoal.cards import PriceTable, PublishedPrice, genai_prices_source, list_price
from shoal.settings import parse_fleet


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """A price lookup reads bundled data only: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a price lookup tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def fallback_table(monkeypatch: pytest.MonkeyPatch) -> PriceTable:
    """A fallback table with one model genai-prices does not know."""
    table = PriceTable(
        as_of="2024-12-01",
        models={
            "acme-mini": PublishedPrice(
                provider="acme", input_per_mtok=0.2, output_per_mtok=0.8, context=32000
            )
        },
    )
    monkeypatch.setattr("shoal.cards.published_prices", lambda: table)
    monkeypatch.setattr("shoal.fleet.published_prices", lambda: table)
    return table


def fleet_from(text: str, tmp_path: Path) -> Fleet:
    settings = parse_fleet(text, source="test").model_copy(update={"cache_dir": tmp_path})
    return Fleet(settings)


def test_a_well_known_model_is_priced_from_genai_prices() -> None:
    listed = list_price("gpt-4o-mini")
    assert listed.source == genai_prices_source()
    assert listed.source.startswith("genai-prices ")
    assert listed.provider == "openai"
    assert listed.price == TokenPrice(input_per_mtok=0.15, output_per_mtok=0.60)
    assert listed.context == 128000


def test_a_tiered_price_gives_its_base_rate() -> None:
    listed = list_price("gemini-1.5-flash")  # dearer past 128k prompt tokens
    assert listed.price == TokenPrice(input_per_mtok=0.075, output_per_mtok=0.30)


def test_a_model_genai_prices_does_not_know_comes_from_the_fallback_table(
    fallback_table: PriceTable,
) -> None:
    listed = list_price("acme-mini")
    assert listed.source == "shoal's price table of 2024-12-01"
    assert listed.price == TokenPrice(input_per_mtok=0.2, output_per_mtok=0.8)
    assert listed.context == 32000


def test_a_model_neither_knows_lists_the_fallback_models(fallback_table: PriceTable) -> None:
    with pytest.raises(UnknownModelError, match="acme-mini") as caught:
        list_price("acme-ultra")
    assert caught.value.name == "acme-ultra"
    assert caught.value.known == ["acme-mini"]


def test_the_bundled_table_still_prices_its_models_as_a_fallback() -> None:
    from shoal.cards import published_prices

    entry = published_prices().get("gpt-4o-mini")
    assert entry.source == f"shoal's price table of {published_prices().as_of}"
    with pytest.raises(UnknownModelError):
        list_price("gpt-99")  # genai-prices' OpenAI provider does not know it either


def test_fleet_cards_say_where_their_price_came_from(
    tmp_path: Path, fallback_table: PriceTable
) -> None:
    fleet = fleet_from(
        """
include_default: false
models:
  - {id: mini, kind: openai, base_url: "http://127.0.0.1:9/v1", model: gpt-4o-mini}
  - {id: acme, kind: openai, base_url: "http://127.0.0.1:9/v1", model: acme-mini}
  - id: own
    kind: openai
    base_url: "http://127.0.0.1:9/v1"
    model: gpt-4o-mini
    price: {input_per_mtok: 1.0, output_per_mtok: 2.0}
""",
        tmp_path,
    )
    mini, acme, own = (fleet.card(i) for i in ("mini", "acme", "own"))
    assert mini.price == TokenPrice(input_per_mtok=0.15, output_per_mtok=0.60)
    assert mini.price_source == genai_prices_source()
    assert acme.price == TokenPrice(input_per_mtok=0.2, output_per_mtok=0.8)
    assert acme.context == 32000
    assert acme.price_source == "shoal's price table of 2024-12-01"
    assert own.price == TokenPrice(input_per_mtok=1.0, output_per_mtok=2.0)
    assert own.context == 128000  # the price is the fleet file's, the context window listed
    assert own.price_source is None


def test_an_api_model_no_source_knows_fails_clearly(
    tmp_path: Path, fallback_table: PriceTable
) -> None:
    with pytest.raises(ConfigError, match="give its price and context") as caught:
        fleet_from(
            "models: [{id: x, kind: openai, base_url: 'http://h/v1', model: acme-ultra}]\n",
            tmp_path,
        )
    message = str(caught.value)
    assert "'acme-ultra'" in message
    assert genai_prices_source() in message
    assert "shoal's price table of 2024-12-01" in message
    assert "acme-mini" in message  # what the fallback table knows
