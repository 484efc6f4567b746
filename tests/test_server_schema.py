"""The OpenAI wire format and shoal's types, translated both ways (no server, no socket)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from shoal.errors import InvalidRequestError
from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    Message,
    RouteDecision,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    Usage,
)
from shoal.server import sse
from shoal.server.errors import (
    AuthenticationError,
    BudgetExceededError,
    PayloadTooLargeError,
    RateLimitedError,
    error_reply,
)
from shoal.server.metrics import Metrics
from shoal.server.openai_schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkWriter,
    completion_of,
    events_of,
    from_chat_request,
    response_of,
    to_chat_request,
)
from shoal.server.routes import parse_request

SCHEMA: dict[str, Any] = {"type": "object", "properties": {"city": {"type": "string"}}}
DECISION = RouteDecision(route="cheap", models=("tiny",), reason="cheapest meeting the target")

REQUESTS = [
    ChatRequest.of("hi"),
    ChatRequest(
        messages=(
            Message(role="system", content="Be brief."),
            Message(role="user", content="Name a city."),
            Message(role="assistant", content="Paris."),
            Message(role="user", content="Another."),
        ),
        max_tokens=12,
        temperature=0.7,
        top_p=0.9,
        stop=("\n", "END"),
        seed=7,
        logprobs=True,
        top_logprobs=3,
    ),
    ChatRequest.of("json please", json_object=True),
    ChatRequest.of("a city", json_schema=SCHEMA, max_tokens=40),
]

RESPONSES = [
    ChatResponse(
        model="tiny",
        text="Paris.",
        finish_reason="stop",
        usage=Usage(input_tokens=12, output_tokens=3),
        latency_s=0.25,
        cost_usd=1.5e-6,
    ),
    ChatResponse(
        model="tiny",
        text="a b",
        finish_reason="length",
        usage=Usage(input_tokens=4, output_tokens=2),
        latency_s=0.5,
        cost_usd=2e-6,
        logprobs=(
            TokenLogprob(token="a", logprob=-0.1, top=(("a", -0.1), ("b", -2.5))),
            TokenLogprob(token=" b", logprob=-0.3),
        ),
        usage_estimated=True,
        decision=DECISION,
    ),
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_request_round_trips_through_the_wire(request_: ChatRequest) -> None:
    wire = from_chat_request(request_, "tiny")
    again = ChatCompletionRequest.model_validate_json(
        wire.model_dump_json(exclude_none=True, by_alias=True)
    )
    assert to_chat_request(again) == request_


def test_wire_request_translates_every_field() -> None:
    wire = ChatCompletionRequest.model_validate(
        {
            "model": "cheap",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}],
                },
            ],
            "max_completion_tokens": 9,
            "temperature": 0.5,
            "stop": "END",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": SCHEMA},
            },
            "logprobs": True,
            "top_logprobs": 2,
            "n": 1,
            "user": "someone",
        }
    )
    assert to_chat_request(wire) == ChatRequest(
        messages=(Message(role="system", content="Be brief."), Message(role="user", content="a b")),
        max_tokens=9,
        temperature=0.5,
        stop=("END",),
        json_schema=SCHEMA,
        logprobs=True,
        top_logprobs=2,
    )


@pytest.mark.parametrize("response", RESPONSES)
def test_response_round_trips_through_the_wire(response: ChatResponse) -> None:
    completion = completion_of(response, completion_id="chatcmpl-1", created=1, route="cheap")
    again = response_of(ChatCompletion.model_validate_json(completion.model_dump_json()))
    assert again == response.model_copy(update={"compute_s": 0.0, "ttft_s": None})


def test_completion_has_openai_fields() -> None:
    data = json.loads(
        completion_of(RESPONSES[1], completion_id="c", created=1, route=None).model_dump_json()
    )
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "a b", "refusal": None}
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    first = data["choices"][0]["logprobs"]["content"][0]
    assert first["token"] == "a"
    assert first["bytes"] == [97]
    assert [t["token"] for t in first["top_logprobs"]] == ["a", "b"]
    assert data["shoal"]["cost_usd"] == 2e-6


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_round_trips_through_chunks(include_usage: bool) -> None:
    response = RESPONSES[1]
    assert response.logprobs is not None
    events: list[StreamEvent] = [
        TextDelta(text="a", logprobs=response.logprobs[:1]),
        TextDelta(text=" b", logprobs=response.logprobs[1:]),
        Completed(response=response),
    ]
    writer = ChunkWriter(
        completion_id="c",
        created=1,
        model="cheap",
        route="cheap",
        include_usage=include_usage,
        logprobs=True,
    )
    chunks = [c for e in events for c in writer.chunks(e)]
    wire = [ChatCompletionChunk.model_validate_json(c.model_dump_json()) for c in chunks]
    assert wire[0].choices[0].delta.role == "assistant"
    assert wire[-1].shoal is not None
    if not include_usage:
        # Without the usage chunk the stream cannot say its token counts.
        with pytest.raises(ValueError, match="usage"):
            events_of(wire)
        return
    assert wire[-1].choices == []
    again = events_of(wire)
    assert again[:2] == events[:2]
    assert again[2] == Completed(
        response=response.model_copy(update={"compute_s": 0.0, "ttft_s": None})
    )


@pytest.mark.parametrize(
    ("body", "kind", "param"),
    [
        (b"{not json", "MalformedRequestError", None),
        (b"", "MalformedRequestError", None),
        (b"[1, 2]", "MalformedRequestError", None),
        (b'{"model": "m"}', "MalformedRequestError", "messages"),
        (
            b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}',
            "MalformedRequestError",
            None,
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}',
            "UnsupportedParameterError",
            "tools",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}',
            "UnsupportedParameterError",
            "n",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
            b'"presence_penalty": 1}',
            "UnsupportedParameterError",
            "presence_penalty",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
            "MalformedRequestError",
            None,
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
            b'"stream_options": {"include_usage": true}}',
            "MalformedRequestError",
            None,
        ),
    ],
)
def test_bad_requests_are_named_errors(body: bytes, kind: str, param: str | None) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_request(body)
    assert type(caught.value).__name__ == kind
    reply = error_reply(caught.value)
    assert reply.status == 400
    if param is not None:
        assert reply.body.error.param == param


def test_error_table_statuses() -> None:
    assert error_reply(AuthenticationError("no")).status == 401
    assert error_reply(BudgetExceededError("no")).status == 402
    assert error_reply(PayloadTooLargeError(10)).status == 413
    limited = error_reply(RateLimitedError("slow down", retry_after_s=2.2))
    assert (limited.status, limited.headers["retry-after"]) == (429, "3")
    unexpected = error_reply(RuntimeError("secret prompt text"))
    assert unexpected.status == 500
    assert "secret" not in unexpected.body.error.message


def test_invalid_requests_never_reach_a_model() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "", "messages": []})


def test_sse_encoding() -> None:
    chunk = ChunkWriter(
        completion_id="c", created=1, model="m", route=None, include_usage=False, logprobs=False
    ).chunks(TextDelta(text="hi"))[0]
    data = sse.encode(sse.Data(chunk))
    assert data.startswith(b"data: {")
    assert data.endswith(b"\n\n")
    assert sse.encode(sse.Done()) == b"data: [DONE]\n\n"
    failure = sse.encode(sse.Failure(error_reply(RateLimitedError("x")).body))
    assert json.loads(failure[6:])["error"]["code"] == "rate_limit_exceeded"


def test_metrics_exposition() -> None:
    metrics = Metrics()
    metrics.request(
        name="cheap",
        route="cheap",
        model="tiny",
        status="ok",
        latency_s=0.02,
        input_tokens=3,
        output_tokens=4,
        cost_usd=1e-6,
    )
    metrics.request(
        name='we"ird', route=None, model=None, status="model_not_found", latency_s=0.001
    )
    metrics.decision(route="cheap", model="tiny", target_met=True)
    text = metrics.render()
    assert 'shoal_requests_total{name="cheap",route="cheap",model="tiny",status="ok"} 1' in text
    assert 'shoal_tokens_total{route="cheap",model="tiny",kind="output"} 4' in text
    assert 'name="we\\"ird"' in text
    assert 'shoal_request_latency_seconds_bucket{name="cheap",route="cheap",le="0.025"} 1' in text
    assert 'shoal_request_latency_seconds_bucket{name="cheap",route="cheap",le="0.01"} 0' in text
    assert 'shoal_route_decisions_total{route="cheap",model="tiny",target_met="true"} 1' in text
