"""Checks on structured output shared by every adapter.

A JSON answer that `max_tokens` cut short, or that does not match its schema, is never returned
as if it were valid.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from shoal.errors import OutputInvalidError, OutputTruncatedError
from shoal.messages import ChatRequest, ChatResponse


def check_json(request: ChatRequest, response: ChatResponse) -> Any:
    """Parse and validate a JSON answer; returns the parsed value. The errors carry the response,
    so the call is still costed."""
    model_id, text = response.model, response.text
    if response.finish_reason == "length":
        raise OutputTruncatedError(
            f"{model_id}: max_tokens={request.max_tokens} cut the JSON output short; "
            "raise max_tokens or tighten the schema",
            text=text,
            response=response,
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputInvalidError(
            f"{model_id}: output is not valid JSON: {exc}", text=text, response=response
        ) from exc
    if request.json_schema is not None:
        try:
            jsonschema.validate(value, request.json_schema)
        except jsonschema.ValidationError as exc:
            raise OutputInvalidError(
                f"{model_id}: output does not match the schema: {exc.message}",
                text=text,
                response=response,
            ) from exc
    elif not isinstance(value, dict):
        raise OutputInvalidError(
            f"{model_id}: expected a JSON object", text=text, response=response
        )
    return value
