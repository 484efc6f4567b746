"""The fleet file: valid files round-trip, invalid ones say where they are wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shoal import ConfigError
from shoal.settings import FleetSettings, GGUFModelSpec, OpenAIModelSpec, load_fleet, parse_fleet

VALID = """
host_price_per_hour: 0.5
include_default: false
models:
  - id: my-gguf
    kind: gguf
    path: /models/phi.gguf
    context: 2048
  - id: cheap-cloud
    kind: openai
    base_url: http://127.0.0.1:9/v1
    model: gpt-4o-mini
    api_key_env: OPENAI_API_KEY
"""


def test_a_valid_file_parses() -> None:
    settings = parse_fleet(VALID, source="fleet.yaml")
    assert settings.host_price_per_hour == 0.5
    gguf, api = settings.models
    assert isinstance(gguf, GGUFModelSpec)
    assert gguf.path == Path("/models/phi.gguf")
    assert isinstance(api, OpenAIModelSpec)
    assert api.upstream_model == "gpt-4o-mini"


def test_settings_round_trip_through_yaml() -> None:
    settings = parse_fleet(VALID, source="fleet.yaml")
    dumped = yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True))
    assert parse_fleet(dumped, source="again.yaml") == settings


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "models:\n  - id: a\n    kind: gguf\n    path: x.gguf\n    colour: red\n",
            "models.0.gguf.colour",
        ),
        (
            "models:\n  - id: a\n    kind: gguf\n    path: x.gguf\n    context: -5\n",
            "models.0.gguf.context",
        ),
        ("models:\n  - id: a\n    kind: ollama\n", "models.0"),
        (
            "models:\n  - id: a\n    kind: openai\n    base_url: ftp://x\n",
            "models.0.openai.base_url",
        ),
        ("models:\n  - id: a\n    kind: gguf\n", "give exactly one of 'path' or 'packaged'"),
        ("host_price_per_hour: cheap\n", "host_price_per_hour"),
        ("unknown_top_level: 1\n", "unknown_top_level"),
        (
            "models:\n  - {id: a, kind: gguf, path: x}\n  - {id: a, kind: gguf, path: y}\n",
            "listed twice",
        ),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_invalid_files_say_where(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_fleet(text, source="fleet.yaml")
    assert str(caught.value).startswith("fleet.yaml")
    assert where in str(caught.value)


def test_broken_yaml_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"fleet.yaml:3:\d+: not valid YAML"):
        parse_fleet("models:\n  - id: a\n  kind: [unclosed\n", source="fleet.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read fleet file"):
        load_fleet(tmp_path / "nope.yaml")


def test_empty_file_is_the_default_fleet(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text("", "utf-8")
    assert load_fleet(tmp_path / "fleet.yaml") == FleetSettings()
