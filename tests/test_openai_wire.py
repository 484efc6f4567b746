"""The OpenAI wire format and shoal's types, translated both ways (no server, no socket).

Each translation is checked against its inverse: shoal -> wire -> shoal gives back what it was
given, for requests (both JSON-schema styles), completions and chunk streams.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import shoal.openai_wire
from shoal.errors import BackendError
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
from shoal.openai_wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkReader,
    ChunkWriter,
    JsonSchemaStyle,
    completion_of,
    error_message,
    events_of,
    from_chat_request,
    read_chunk,
    response_of,
    shoal_logprobs,
    to_chat_request,
)

SCHEMA: dict[str, Any] = {"type": "object", "properties": {"city": {"type": "string"}}}
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
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


def over_the_wire(request: ChatRequest, *, stream: bool, style: JsonSchemaStyle) -> ChatRequest:
    """`request` sent as a JSON body, and read back as the server reads a client's body."""
    body = from_chat_request(request, "tiny", stream=stream, schema_style=style).body()
    return to_chat_request(ChatCompletionRequest.model_validate_json(json.dumps(body)))


def writer(*, include_usage: bool, logprobs: bool = True) -> ChunkWriter:
    return ChunkWriter(
        completion_id="c",
        created=1,
        model="cheap",
        route="cheap",
        include_usage=include_usage,
        logprobs=logprobs,
    )


def test_the_wire_sits_below_models_and_server() -> None:
    source = Path(shoal.openai_wire.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert {m for m in imported if m.split(".")[0] == "shoal"} <= {"shoal.messages", "shoal.errors"}


# -- requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["openai", "llama_cpp"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("request_", REQUESTS)
def test_request_round_trips_through_the_wire(
    request_: ChatRequest, stream: bool, style: JsonSchemaStyle
) -> None:
    assert over_the_wire(request_, stream=stream, style=style) == request_


def test_request_body_translates_every_field() -> None:
    request = ChatRequest(
        messages=(
            Message(role="system", content="Be brief."),
            Message(role="user", content="Name a person."),
        ),
        max_tokens=64,
        temperature=0.5,
        top_p=0.9,
        stop=("\n\n", "END"),
        seed=7,
        json_schema=PERSON_SCHEMA,
        logprobs=True,
        top_logprobs=3,
    )
    assert from_chat_request(request, "gpt-x").body() == {
        "model": "gpt-x",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a person."},
        ],
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "stream": False,
        "stop": ["\n\n", "END"],
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 3,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": PERSON_SCHEMA, "strict": True},
        },
    }
    streamed = from_chat_request(request, "gpt-x", stream=True, schema_style="llama_cpp").body()
    assert streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True}
    assert streamed["response_format"] == {"type": "json_object", "schema": PERSON_SCHEMA}


def test_request_body_leaves_out_unset_options() -> None:
    body = from_chat_request(ChatRequest.of("hi", json_object=True), "m").body()
    assert body["response_format"] == {"type": "json_object"}
    for absent in ("stop", "seed", "logprobs", "top_logprobs", "stream_options"):
        assert absent not in body
    plain = from_chat_request(ChatRequest.of("hi", logprobs=True), "m").body()
    assert plain["logprobs"] is True
    assert "top_logprobs" not in plain
    assert "response_format" not in plain
    # A JSON object with no schema is the same request in both styles.
    llama = from_chat_request(ChatRequest.of("hi", json_object=True), "m", schema_style="llama_cpp")
    assert llama.body() == body


def test_a_schema_keeps_its_nulls() -> None:
    schema = {"type": ["string", "null"], "default": None, "enum": ["a", None]}
    for style in ("openai", "llama_cpp"):
        request = ChatRequest.of("x", json_schema=schema)
        body = from_chat_request(request, "m", schema_style=style).body()
        sent = body["response_format"]
        assert (sent.get("schema") or sent["json_schema"]["schema"]) == schema


@pytest.mark.parametrize("strict", [True, False, None])
def test_strict_is_sent_always_and_read_as_always(strict: bool | None) -> None:
    # shoal checks every JSON answer against its schema: it asks upstreams for strict decoding,
    # and a client's `strict` changes nothing.
    spec: dict[str, Any] = {"name": "city", "schema": SCHEMA}
    if strict is not None:
        spec["strict"] = strict
    wire = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "a city"}],
            "response_format": {"type": "json_schema", "json_schema": spec},
        }
    )
    request = to_chat_request(wire)
    assert request == ChatRequest.of("a city", json_schema=SCHEMA)
    sent = from_chat_request(request, "m").body()["response_format"]["json_schema"]
    assert sent["strict"] is True
    assert (
        "strict"
        not in from_chat_request(request, "m", schema_style="llama_cpp").body()["response_format"]
    )


def test_llama_cpp_schema_form_is_read_as_a_schema() -> None:
    wire = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "a city"}],
            "response_format": {"type": "json_object", "schema": SCHEMA},
        }
    )
    assert to_chat_request(wire) == ChatRequest.of("a city", json_schema=SCHEMA)


def test_the_server_limits_are_not_the_upstream_limits() -> None:
    # A client of the server may give at most 4 stop sequences; an upstream may take more.
    request = ChatRequest.of("hi", stop=("a", "b", "c", "d", "e"))
    body = from_chat_request(request, "m").body()
    assert body["stop"] == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValidationError, match="at most 4"):
        ChatCompletionRequest.model_validate(body)


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


def test_invalid_requests_never_reach_a_model() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "", "messages": []})
    with pytest.raises(ValidationError, match="schema_"):
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object", "schema_": SCHEMA},
            }
        )


# -- completions ---------------------------------------------------------------------------------


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


def test_the_schema_says_shoal_writes_every_field() -> None:
    schema = ChatCompletion.model_json_schema(mode="serialization")
    assert {"id", "created", "model", "choices", "usage", "shoal"} <= set(schema["required"])


def test_another_servers_completion_reads_leniently() -> None:
    completion = ChatCompletion.model_validate(
        {
            "id": "x",
            "choices": [
                {
                    "message": {"role": "assistant", "content": "Paris", "reasoning": "kept"},
                    "finish_reason": "content_filter",
                    "logprobs": {
                        "content": [{"token": "Paris", "logprob": -1, "top_logprobs": None}]
                    },
                }
            ],
            "timings": {"predicted_ms": 3.5},
        }
    )
    response = response_of(completion)
    assert response == ChatResponse(
        model="",
        text="Paris",
        finish_reason="stop",
        usage=Usage(),
        latency_s=0.0,
        logprobs=(TokenLogprob(token="Paris", logprob=-1.0),),
        usage_estimated=True,
    )
    assert completion.model_extra == {"timings": {"predicted_ms": 3.5}}


@pytest.mark.parametrize("finish", [None, "stop", "eos", "tool_calls"])
def test_any_finish_but_length_reads_as_stop(finish: str | None) -> None:
    data = {"id": "x", "choices": [{"message": {"content": "a"}, "finish_reason": finish}]}
    assert response_of(ChatCompletion.model_validate(data)).finish_reason == "stop"
    data["choices"][0]["finish_reason"] = "length"
    assert response_of(ChatCompletion.model_validate(data)).finish_reason == "length"


@pytest.mark.parametrize(
    "data",
    [{"id": "x", "choices": []}, {"id": "x"}, {"choices": [{"message": {}}]}, [], "text"],
    ids=["no-choice", "no-choices", "no-id", "a-list", "a-string"],
)
def test_what_is_not_a_completion_is_an_error(data: Any) -> None:
    with pytest.raises(ValidationError):
        ChatCompletion.model_validate(data)


def test_openai_logprobs_read_as_token_logprobs() -> None:
    data = {
        "content": [
            {
                "token": "Par",
                "logprob": -0.25,
                "bytes": [80, 97, 114],
                "top_logprobs": [
                    {"token": "Par", "logprob": -0.25, "bytes": None},
                    {"token": "Lon", "logprob": -2, "bytes": None},
                ],
            },
            {"token": "is", "logprob": 0, "bytes": None, "top_logprobs": None},
        ],
        "refusal": None,
    }
    assert shoal_logprobs(ChoiceLogprobs.model_validate(data)) == (
        TokenLogprob(token="Par", logprob=-0.25, top=(("Par", -0.25), ("Lon", -2.0))),
        TokenLogprob(token="is", logprob=0.0),
    )


@pytest.mark.parametrize("data", [{}, {"content": None}, {"content": []}])
def test_logprobs_of_nothing_are_empty(data: Any) -> None:
    assert shoal_logprobs(ChoiceLogprobs.model_validate(data)) == ()
    assert shoal_logprobs(None) == ()


def test_junk_logprobs_are_an_error() -> None:
    with pytest.raises(ValidationError):
        ChoiceLogprobs.model_validate("junk")


# -- streams -------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_round_trips_through_chunks(include_usage: bool) -> None:
    response = RESPONSES[1]
    assert response.logprobs is not None
    events: list[StreamEvent] = [
        TextDelta(text="a", logprobs=response.logprobs[:1]),
        TextDelta(text=" b", logprobs=response.logprobs[1:]),
        Completed(response=response),
    ]
    write = writer(include_usage=include_usage)
    chunks = [c for e in events for c in write.chunks(e)]
    wire = [ChatCompletionChunk.model_validate_json(c.model_dump_json()) for c in chunks]
    assert wire[0].choices[0].delta.role == "assistant"
    assert wire[-1].shoal is not None
    if not include_usage:
        # Without the usage chunk the stream cannot say its token counts.
        with pytest.raises(ValueError, match="usage"):
            events_of(wire)
        return
    assert wire[-1].choices == []
    assert wire[-1].usage is not None
    again = events_of(wire)
    assert again[:2] == events[:2]
    assert again[2] == Completed(
        response=response.model_copy(update={"compute_s": 0.0, "ttft_s": None})
    )


@pytest.mark.parametrize("response", RESPONSES)
def test_a_stream_reads_as_the_completion_it_adds_up_to(response: ChatResponse) -> None:
    write = writer(include_usage=True, logprobs=response.logprobs is not None)
    events: list[StreamEvent] = [
        TextDelta(text=t.token, logprobs=(t,)) for t in response.logprobs or ()
    ] or [TextDelta(text=response.text)]
    events.append(Completed(response=response))
    reader = ChunkReader()
    seen: list[TextDelta] = []
    for event in events:
        for chunk in write.chunks(event):
            seen.extend(reader.read(read_chunk(chunk.model_dump_json())))
    assert seen == events[:-1]
    assert reader.deltas == len(seen)
    whole = completion_of(response, completion_id="c", created=1, route="cheap")
    assert reader.response() == response_of(whole)


def test_a_stream_without_usage_or_shoal_object() -> None:
    # How llama.cpp's server streams: a role chunk, one chunk per token, a finish chunk.
    payloads = [
        {"id": "c", "choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"id": "c", "model": "up", "choices": [{"delta": {"content": "Hel"}}]},
        {"id": "c", "choices": [{"delta": {"content": "lo"}, "finish_reason": None}]},
        {"id": "c", "choices": [{"delta": {}, "finish_reason": "length"}]},
    ]
    reader = ChunkReader()
    deltas = [d for p in payloads for d in reader.read(read_chunk(json.dumps(p)))]
    assert deltas == [TextDelta(text="Hel"), TextDelta(text="lo")]
    assert (reader.usage, reader.shoal, reader.deltas) == (None, None, 2)
    assert reader.response() == ChatResponse(
        model="up",
        text="Hello",
        finish_reason="length",
        usage=Usage(),
        latency_s=0.0,
        usage_estimated=True,
    )


def test_an_error_in_a_stream_raises_with_its_message() -> None:
    with pytest.raises(BackendError, match="model crashed"):
        read_chunk(json.dumps({"error": {"message": "model crashed", "type": "server_error"}}))
    for junk in ("{not json", "[1, 2]", '{"content": "x"}'):
        with pytest.raises(ValueError):  # noqa: PT011 - any ValueError: pydantic's or JSON's
            read_chunk(junk)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"error": {"message": "no such model", "type": "invalid_request_error"}}', "no such"),
        ('{"error": "model not found"}', "model not found"),
        ('{"message": "rate limited"}', "rate limited"),
        ("Bad Gateway", "Bad Gateway"),
        ('["odd"]', '["odd"]'),
    ],
)
def test_error_message_of_each_servers_error_body(body: str, message: str) -> None:
    assert error_message(body).startswith(message)
    assert len(error_message(body * 200)) <= 500
