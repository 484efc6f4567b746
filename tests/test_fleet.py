"""The fleet: the embedded default tiers, the user's own models, cards and measurements."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal import (
    ChatRequest,
    ConfigError,
    Fleet,
    HostPrice,
    ModelNotInstalledError,
    TokenPrice,
    UnknownModelError,
)
from shoal.cards import Measured
from shoal.models.openai_compat import OpenAICompatModel
from shoal.settings import parse_fleet

DEFAULT_IDS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def fleet_from(text: str, tmp_path: Path) -> Fleet:
    settings = parse_fleet(text, source="test").model_copy(update={"cache_dir": tmp_path})
    return Fleet(settings)


def test_the_default_fleet_has_three_tiers() -> None:
    fleet = Fleet()
    assert fleet.ids == DEFAULT_IDS
    assert [fleet.card(i).tier for i in DEFAULT_IDS] == ["tiny", "small", "large"]
    params = [fleet.card(i).params or 0 for i in DEFAULT_IDS]
    assert params == sorted(params)
    for card in fleet.cards():
        assert card.runs == "local"
        assert isinstance(card.price, HostPrice)


def test_unknown_model_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownModelError) as caught:
        Fleet().model("gpt-5-ultra")
    assert caught.value.known == sorted(DEFAULT_IDS)
    assert "smollm2-135m" in str(caught.value)


def test_user_models_join_the_default_fleet(tmp_path: Path, tiny_path: Path) -> None:
    fleet = fleet_from(
        f"""
models:
  - {{id: my-tiny, kind: gguf, path: "{tiny_path}", context: 1024}}
  - {{id: mini, kind: openai, base_url: "http://127.0.0.1:9/v1", model: gpt-4o-mini}}
""",
        tmp_path,
    )
    assert fleet.ids == [*DEFAULT_IDS, "my-tiny", "mini"]
    assert fleet.card("my-tiny").context == 1024
    mini = fleet.card("mini")
    assert mini.price == TokenPrice(input_per_mtok=0.15, output_per_mtok=0.60)
    assert mini.context == 128000
    assert isinstance(fleet.model("mini"), OpenAICompatModel)


async def test_a_user_gguf_answers(tmp_path: Path, tiny_path: Path) -> None:
    fleet = fleet_from(
        f'include_default: false\nmodels: [{{id: mine, kind: gguf, path: "{tiny_path}"}}]\n',
        tmp_path,
    )
    response = await fleet.model("mine").generate(ChatRequest.of("Hi!", max_tokens=5))
    assert response.model == "mine"
    assert response.text


def test_a_missing_user_gguf(tmp_path: Path) -> None:
    fleet = fleet_from(
        f'models: [{{id: gone, kind: gguf, path: "{tmp_path}/gone.gguf"}}]\n', tmp_path
    )
    assert not fleet.installed("gone")
    with pytest.raises(ModelNotInstalledError, match=r"gone\.gguf"):
        fleet.model("gone")


def test_an_api_model_without_a_known_price_must_give_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give its price and context") as caught:
        fleet_from("models: [{id: x, kind: openai, base_url: 'http://h/v1'}]\n", tmp_path)
    assert "gpt-4o-mini" in str(caught.value)  # lists what the price table knows


def test_an_empty_fleet_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no models"):
        fleet_from("include_default: false\n", tmp_path)


def test_host_price_prices_local_models(tmp_path: Path) -> None:
    fleet = fleet_from("host_price_per_hour: 3.6\n", tmp_path)
    assert fleet.card("smollm2-135m").price == HostPrice(per_hour=3.6)


def test_measurements_feed_the_cards_and_persist(tmp_path: Path) -> None:
    fleet = fleet_from("", tmp_path)
    measured = Measured(
        load_s=0.2, prompt_tok_s=900, gen_tok_s=70, peak_rss_mb=250, measured_at="2026-01-01"
    )
    fleet.record_measurement("smollm2-135m", measured)
    assert fleet.card("smollm2-135m").measured == measured
    assert fleet_from("", tmp_path).card("smollm2-135m").measured == measured


def test_packaged_tiers_are_installed_and_verified() -> None:
    fleet = Fleet()
    assert all(fleet.installed(i) for i in DEFAULT_IDS)
    assert fleet.gguf_path("smollm2-135m").stat().st_size > 90_000_000


def test_reusing_a_built_in_id_is_an_error_unless_it_says_replace(
    tmp_path: Path, tiny_path: Path
) -> None:
    entry = f'{{id: smollm2-135m, kind: gguf, path: "{tiny_path}", context: 1024'
    path = tmp_path / "fleet.yaml"
    path.write_text(f"models:\n  - {entry}}}\n", "utf-8")
    with pytest.raises(ConfigError, match="'smollm2-135m' is a built-in model") as caught:
        Fleet.from_file(path)
    assert str(path) in str(caught.value)
    assert "replace: true" in str(caught.value)

    fleet = fleet_from(f"models:\n  - {entry}, replace: true}}\n", tmp_path)
    assert fleet.ids == [*DEFAULT_IDS[1:], "smollm2-135m"]
    assert fleet.card("smollm2-135m").context == 1024
    # Without the default fleet there is nothing to collide with.
    alone = fleet_from(f"include_default: false\nmodels:\n  - {entry}}}\n", tmp_path)
    assert alone.ids == ["smollm2-135m"]
    with pytest.raises(ConfigError, match="no built-in model has that id"):
        fleet_from(
            f'models: [{{id: mine, kind: gguf, path: "{tiny_path}", replace: true}}]\n', tmp_path
        )
