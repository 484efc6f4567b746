"""The server's OpenAPI 3.1 description, generated from the wire models in `shoal.openai_wire`.

Served at `/openapi.json`; the names the server answers to are listed as examples of `model`,
the pipelines it runs as examples of a run's `name`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shoal.openai_wire import ChatCompletion, ChatCompletionRequest, ErrorBody, ModelList
from shoal.server.runbook import RunEventData, RunInfo, RunRequest

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
        (RunRequest, "validation"),
        (RunInfo, "serialization"),
        (RunEventData, "serialization"),
    ]
    _, top = models_json_schema(models, ref_template=_REF)
    return dict(top.get("$defs", {}))


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _error(text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": _ref("ErrorBody")}}}


_RUN_ERRORS = {
    "400": "not JSON, unknown fields, missing or unknown inputs (budget_usd is required with keys)",
    "401": _ERRORS["401"],
    "402": "the key's budget cannot cover the run's budget_usd",
    "404": "no pipeline of that name (the message lists the valid names), or no such run",
    "413": _ERRORS["413"],
    "429": "the server's runs in flight are at their limit, or the key's rate limit or budget "
    "held by calls in flight (see Retry-After)",
}


def _run_paths(
    pipelines: Sequence[str], security: list[dict[str, list[str]]], auth: bool
) -> dict[str, Any]:
    def errors(*codes: str) -> dict[str, Any]:
        return {c: _error(_RUN_ERRORS[c]) for c in codes if auth or c not in ("401", "402")}

    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "examples": list(pipelines)},
    }
    run_id = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
    info = {"application/json": {"schema": _ref("RunInfo")}}
    return {
        "/v1/pipelines/{name}/runs": {
            "post": {
                "operationId": "startPipelineRun",
                "security": security,
                "parameters": [name],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("RunRequest")}},
                },
                "responses": {
                    "202": {"description": "the run started", "content": info},
                    **errors("400", "401", "402", "404", "413", "429"),
                },
            }
        },
        "/v1/pipelines/{name}/runs/{run_id}": {
            "get": {
                "operationId": "readPipelineRun",
                "security": security,
                "parameters": [name, run_id],
                "responses": {
                    "200": {"description": "the run's status, and its result", "content": info},
                    **errors("401", "404"),
                },
            }
        },
        "/v1/pipelines/{name}/runs/{run_id}/events": {
            "get": {
                "operationId": "streamPipelineRunEvents",
                "security": security,
                "parameters": [name, run_id],
                "responses": {
                    "200": {
                        "description": "server-sent events, each a RunEventData; the last is "
                        "run_done, carrying the result",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **errors("401", "404"),
                },
            }
        },
    }


def openapi_spec(
    *, names: list[str], auth: bool, pipelines: Sequence[str] = (), metrics_auth: bool = False
) -> dict[str, Any]:
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
            **_run_paths(pipelines, security, auth),
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
                    "security": security if metrics_auth else [],
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition (OpenMetrics on request)",
                            "content": {
                                "text/plain": {"schema": {"type": "string"}},
                                "application/openmetrics-text": {"schema": {"type": "string"}},
                            },
                        },
                        **({"401": _error(_ERRORS["401"])} if metrics_auth else {}),
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
