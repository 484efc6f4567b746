"""The larger tiers of the default fleet, for real (slow: run with `-m slow`)."""

from __future__ import annotations

import json

import pytest

from shoal import ChatRequest, Fleet

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model_id", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
async def test_each_larger_tier_answers(model_id: str) -> None:
    fleet = Fleet()
    model = fleet.model(model_id)
    try:
        response = await model.generate(
            ChatRequest.of("What is the capital of France? One word.", max_tokens=8)
        )
        assert "paris" in response.text.lower()
        schema = {
            "type": "object",
            "properties": {"sentiment": {"enum": ["positive", "negative"]}},
            "required": ["sentiment"],
        }
        labelled = await model.generate(
            ChatRequest.of(
                "Sentiment of the review 'dirty and noisy room'?", max_tokens=20, json_schema=schema
            )
        )
        assert json.loads(labelled.text)["sentiment"] == "negative"
    finally:
        await fleet.aclose()
