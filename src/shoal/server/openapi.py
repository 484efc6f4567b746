"""The server's OpenAPI 3.1 description, generated from the wire models in `openai_schema`.

Served at `/openapi.json`; the names the server answers to are listed as examples of `model`.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shoal.server.openai_schema import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorBody,
    ModelList,
)

_REF = "#/components/schemas/{model}"
_ERRORS = {
    "400": "malformed request, unsupported parameter, or prompt over the context window",
    "401": "no API key, or an unknown one",
    "402": "the key's budget cannot cover this call's worst-case cost",
    "404": "no model or route of that name (the message lists the valid names)",
    "413": "the body is over the size limit",
    "429": "the key's rate limit, or its budget held by calls in flight (see Retry-After)",
    "502": "the model's backend failed, or answered in the wrong form",
    "503": "the model's queue is full (see Retry-After)",
    "504": "the model's backend did not answer in time",
}


@cache
def _schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [
        (ChatCompletionRequest, "validation"),
        (ChatCompletion, "serialization"),
        (ModelList, "serialization"),
        (ErrorBody, "serialization"),
    ]
    _, top = models_json_schema(models, ref_template=_REF)
    return dict(top.get("$defs", {}))


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _error(text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": _ref("ErrorBody")}}}


def openapi_spec(*, names: list[str], auth: bool) -> dict[str, Any]:
    schemas = copy.deepcopy(_schemas())
    model_field = schemas["ChatCompletionRequest"]["properties"]["model"]
    model_field["examples"] = names
    security: list[dict[str, list[str]]] = [{"bearer": []}] if auth else []
    completion_errors = {code: _error(text) for code, text in _ERRORS.items()}
    if not auth:
        completion_errors = {
            c: r for c, r in completion_errors.items() if c not in ("401", "402", "429")
        } | {"429": _error(_ERRORS["429"])}
    return {
        "openapi": "3.1.0",
        "info": {"title": "shoal", "version": "1", "description": "OpenAI-compatible gateway"},
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "security": security,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}},
                    },
                    "responses": {
                        "200": {
                            "description": "the completion, or its stream of chunks",
                            "content": {
                                "application/json": {"schema": _ref("ChatCompletion")},
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **completion_errors,
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "security": security,
                    "responses": {
                        "200": {
                            "description": "models and routes",
                            "content": {"application/json": {"schema": _ref("ModelList")}},
                        },
                        **({"401": _error(_ERRORS["401"])} if auth else {}),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "responses": {
                        "200": {
                            "description": "the server is up",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
