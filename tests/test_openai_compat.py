"""`OpenAICompatModel` over real sockets on 127.0.0.1, no HTTP mocks.

Two upstreams: llama-cpp-python's own OpenAI-compatible server running SmolLM2-135M (what a
real endpoint answers), and a small aiohttp app that misbehaves on purpose (how failures map
into shoal's exception tree).
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from conftest import LlamaServer, free_port
from server_support import serving

from shoal import Fleet, FunctionModel
from shoal.cards import HostPrice, ModelCard, Price, TokenPrice, estimate_tokens
from shoal.engine import Engine
from shoal.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    OutputTruncatedError,
    OverloadedError,
    UpstreamHTTPError,
)
from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    StreamEvent,
    TextDelta,
)
from shoal.models.openai_compat import (
    MAX_EVENT_BYTES,
    OpenAICompatModel,
    ServerSentEvent,
    SSEDecoder,
)
from shoal.openai_wire import JsonSchemaStyle, from_chat_request
from shoal.routing.base import RoutedModel
from shoal.routing.policies import FixedRouter
from shoal.server import create_app
from shoal.settings import ServerSettings

PRICE = TokenPrice(input_per_mtok=0.15, output_per_mtok=0.60)
QUESTION = ChatRequest.of("What is the capital of France?", max_tokens=20)
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def card(model_id: str, base_url: str, price: Price = PRICE) -> ModelCard:
    return ModelCard(
        id=model_id,
        context=2048,
        runs="api",
        where=base_url,
        price=price,
        capabilities=frozenset({"stream", "logprobs", "json_schema"}),
    )


async def collect(model: OpenAICompatModel, request: ChatRequest) -> list[StreamEvent]:
    return [event async for event in model.stream(request)]


def split(events: list[StreamEvent]) -> tuple[list[TextDelta], ChatResponse]:
    """The deltas and the final response of a well-formed stream (exactly one Completed, last)."""
    *deltas, last = events
    assert all(isinstance(e, TextDelta) for e in deltas)
    assert isinstance(last, Completed)
    return [e for e in deltas if isinstance(e, TextDelta)], last.response


# -- a real upstream: llama-cpp-python's OpenAI-compatible server ------------------------------


@pytest.fixture
async def smol(llama_server: LlamaServer) -> AsyncIterator[OpenAICompatModel]:
    model = OpenAICompatModel(
        card("smol-over-http", llama_server.base_url),
        base_url=llama_server.base_url,
        upstream_model=llama_server.alias,
        timeout_s=30.0,
        schema_style="llama_cpp",
    )
    yield model
    await model.aclose()


async def test_real_prompt_gets_a_priced_answer(smol: OpenAICompatModel) -> None:
    response = await smol.generate(QUESTION)
    assert response.model == "smol-over-http"
    assert response.text.strip()
    assert response.usage.input_tokens > 0
    assert 0 < response.usage.output_tokens <= QUESTION.max_tokens
    assert not response.usage_estimated
    assert response.cost_usd == pytest.approx(PRICE.cost(response.usage, 0.0))
    assert response.cost_usd > 0
    assert response.latency_s > 0
    assert response.logprobs is None


async def test_stream_matches_generate(smol: OpenAICompatModel) -> None:
    generated = await smol.generate(QUESTION)
    deltas, streamed = split(await collect(smol, QUESTION))
    assert len(deltas) > 1, "llama_cpp.server streams one token per chunk"
    assert "".join(d.text for d in deltas) == streamed.text
    assert streamed.text == generated.text  # temperature 0: the same greedy answer
    assert streamed.finish_reason == generated.finish_reason
    assert streamed.ttft_s is not None
    assert 0 < streamed.ttft_s <= streamed.latency_s
    # llama_cpp.server ignores stream_options.include_usage, so shoal counts content chunks.
    assert not generated.usage_estimated
    assert streamed.usage_estimated
    assert streamed.usage.output_tokens == generated.usage.output_tokens
    assert streamed.usage.input_tokens > 0
    assert streamed.cost_usd > 0


async def test_json_schema_output_validates(smol: OpenAICompatModel) -> None:
    request = ChatRequest.of(
        "Describe a person as JSON with a name and an age.",
        json_schema=PERSON_SCHEMA,
        max_tokens=80,
    )
    response = await smol.generate(request)
    assert response.finish_reason == "stop"
    jsonschema.validate(json.loads(response.text), PERSON_SCHEMA)


async def test_logprobs_per_generated_token(smol: OpenAICompatModel) -> None:
    # llama_cpp.server builds its Llama with logits_all=True by default, so logprobs work.
    request = QUESTION.model_copy(update={"max_tokens": 10, "logprobs": True, "top_logprobs": 2})
    response = await smol.generate(request)
    assert response.logprobs is not None
    assert len(response.logprobs) == response.usage.output_tokens
    assert "".join(t.token for t in response.logprobs) == response.text
    for token in response.logprobs:
        assert token.logprob <= 0.0
        alternatives = dict(token.top)
        # llama_cpp.server lists the top 2 and appends the chosen token when it is not among them
        # (greedy decoding picks after the repeat penalty, logprobs come from the raw logits).
        assert len(token.top) == (2 if token.token in list(alternatives)[:2] else 3)
        assert alternatives[token.token] == pytest.approx(token.logprob)
        assert token.top[0][1] == max(alternatives.values())

    deltas, streamed = split(await collect(smol, request))
    assert streamed.logprobs is not None
    assert [t for d in deltas for t in d.logprobs] == list(streamed.logprobs)
    assert len(streamed.logprobs) == len(deltas)


async def test_real_400_carries_the_upstream_message(smol: OpenAICompatModel) -> None:
    too_long = ChatRequest.of("hello " * 3000, max_tokens=3)
    with pytest.raises(UpstreamHTTPError) as caught:
        await smol.generate(too_long)
    assert caught.value.status == 400
    assert not caught.value.retryable
    assert "maximum context length is 2048 tokens" in str(caught.value)


async def test_openai_schema_style_is_rejected_by_llama_cpp_server(
    llama_server: LlamaServer,
) -> None:
    # Why the llama.cpp fleet entry needs json_schema_style: llama_cpp. The server does not
    # ignore OpenAI's json_schema form: it fails validation and answers HTTP 500.
    model = OpenAICompatModel(
        card("smol-openai-style", llama_server.base_url),
        base_url=llama_server.base_url,
        upstream_model=llama_server.alias,
        schema_style="openai",
    )
    try:
        with pytest.raises(UpstreamHTTPError) as caught:
            await model.generate(ChatRequest.of("A person?", json_schema=PERSON_SCHEMA))
    finally:
        await model.aclose()
    assert caught.value.status == 500
    assert "json_object" in str(caught.value)


# -- a fake upstream on loopback: how failures map --------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start an aiohttp app answering POST /v1/chat/completions with `handler`; its base URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def adapter() -> AsyncIterator[Callable[..., OpenAICompatModel]]:
    """Build `OpenAICompatModel`s (TokenPrice card, model id "fake-api"); closes them all."""
    models: list[OpenAICompatModel] = []

    def build(base_url: str, **options: Any) -> OpenAICompatModel:
        price = options.pop("price", PRICE)
        model = OpenAICompatModel(card("fake-api", base_url, price), base_url=base_url, **options)
        models.append(model)
        return model

    yield build
    for model in models:
        await model.aclose()


def completion(
    text: str, *, finish: str = "stop", prompt_tokens: int = 11, completion_tokens: int = 3
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "upstream",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk(
    content: str | None = None, *, finish: str | None = None, usage: dict[str, int] | None = None
) -> dict[str, Any]:
    choices = [] if usage else [{"index": 0, "delta": {}, "finish_reason": finish}]
    if content is not None:
        choices[0]["delta"] = {"content": content}
    event: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk"}
    event["choices"] = choices
    if usage:
        event["usage"] = usage
    return event


async def sse(request: web.Request, events: list[Any], *, done: bool = True) -> web.StreamResponse:
    """Answer with server-sent events: dicts as JSON, bytes as they are."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        payload = event if isinstance(event, bytes) else json.dumps(event).encode()
        await response.write(b"data: " + payload + b"\n\n")
    if done:
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(2.0)
    return web.json_response(completion("late"))


@pytest.mark.parametrize("streamed", [False, True], ids=["generate", "stream"])
async def test_slow_upstream_times_out(serve, adapter, streamed: bool) -> None:
    model = adapter(await serve(slow), timeout_s=0.2)
    with pytest.raises(BackendTimeoutError) as caught:
        if streamed:
            await collect(model, QUESTION)
        else:
            await model.generate(QUESTION)
    assert caught.value.retryable
    assert "fake-api" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (401, False), (404, False), (429, True), (500, True), (503, True)],
)
async def test_http_error_status_maps_to_upstream_http_error(
    serve, adapter, status: int, retryable: bool
) -> None:
    async def failing(request: web.Request) -> web.Response:
        message = f"upstream says no ({status})"
        return web.json_response({"error": {"message": message, "type": "x"}}, status=status)

    model = adapter(await serve(failing))
    for call in (model.generate(QUESTION), collect(model, QUESTION)):
        with pytest.raises(UpstreamHTTPError) as caught:
            await call
        assert caught.value.status == status
        assert caught.value.retryable is retryable
        assert f"upstream says no ({status})" in str(caught.value)


async def test_plain_text_error_body_is_kept(serve, adapter) -> None:
    async def gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text="Bad Gateway from the proxy")

    with pytest.raises(UpstreamHTTPError) as caught:
        await adapter(await serve(gateway)).generate(QUESTION)
    assert caught.value.status == 502
    assert caught.value.retryable
    assert "Bad Gateway from the proxy" in str(caught.value)


async def test_undecodable_error_body_still_maps(serve, adapter) -> None:
    async def binary(request: web.Request) -> web.Response:
        return web.Response(status=500, body=b"\xff\xfe\x00oops", content_type="text/plain")

    with pytest.raises(UpstreamHTTPError) as caught:
        await adapter(await serve(binary)).generate(QUESTION)
    assert caught.value.status == 500
    assert "oops" in str(caught.value)


@pytest.mark.parametrize("streamed", [False, True], ids=["generate", "stream"])
async def test_connection_refused_is_unavailable(adapter, streamed: bool) -> None:
    model = adapter(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(BackendUnavailableError) as caught:
        if streamed:
            await collect(model, QUESTION)
        else:
            await model.generate(QUESTION)
    assert caught.value.retryable


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": [{"message": {"content": "trunc',
        b"<html>oops</html>",
        b'{"object": "x"}',
        b"[]",
        b'{"choices": "\xff\xfe"}',
    ],
    ids=["cut-json", "html", "no-choices", "not-an-object", "not-utf8"],
)
async def test_malformed_body_is_backend_error(serve, adapter, body: bytes) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    with pytest.raises(BackendError) as caught:
        await adapter(await serve(broken)).generate(QUESTION)
    assert type(caught.value) is BackendError


async def test_stream_that_is_cut_off_is_backend_error(serve, adapter) -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {json.dumps(chunk('Hel'))}\n\n".encode())
        await response.drain()
        assert request.transport is not None
        request.transport.close()  # mid-body: no last chunk, no [DONE]
        return response

    model = adapter(await serve(dies))
    seen: list[StreamEvent] = []
    with pytest.raises(BackendError) as caught:
        async for event in model.stream(QUESTION):
            seen.append(event)
    assert type(caught.value) is BackendError
    assert seen == [TextDelta(text="Hel")]


@pytest.mark.parametrize(
    ("events", "done"),
    [
        ([chunk("Hel"), chunk("lo")], False),
        ([chunk("Hel"), b"{not json"], True),
        ([chunk("Hel"), b'{"content": "\xff"}'], True),
        ([chunk("Hel"), {"error": {"message": "model crashed"}}], True),
    ],
    ids=["ends-without-done", "malformed-event", "not-utf8-event", "error-event"],
)
async def test_broken_stream_is_backend_error(
    serve, adapter, events: list[Any], done: bool
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        return await sse(request, events, done=done)

    model = adapter(await serve(broken))
    with pytest.raises(BackendError) as caught:
        await collect(model, QUESTION)
    assert type(caught.value) is BackendError


async def test_stream_usage_from_final_chunk_is_exact(serve, adapter) -> None:
    bodies: list[dict[str, Any]] = []

    async def honest(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        if not body["stream"]:
            return web.json_response(completion("Hello", prompt_tokens=11, completion_tokens=3))
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        events = [chunk("He"), chunk("l"), chunk("lo"), chunk(finish="stop"), chunk(usage=usage)]
        return await sse(request, events)

    model = adapter(await serve(honest))
    generated = await model.generate(QUESTION)
    deltas, streamed = split(await collect(model, QUESTION))
    assert [d.text for d in deltas] == ["He", "l", "lo"]
    assert streamed.text == generated.text == "Hello"
    assert not streamed.usage_estimated
    assert streamed.usage == generated.usage
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (11, 3)
    assert streamed.cost_usd == generated.cost_usd == pytest.approx(PRICE.cost(generated.usage, 0))
    assert bodies[1]["stream_options"] == {"include_usage": True}


async def test_stream_without_usage_is_estimated(serve, adapter) -> None:
    async def quiet(request: web.Request) -> web.StreamResponse:
        return await sse(request, [chunk("Hel"), chunk("lo"), chunk(finish="stop")])

    model = adapter(await serve(quiet), price=HostPrice())
    _, streamed = split(await collect(model, ChatRequest.of("12345678")))
    assert streamed.usage_estimated
    prompt = estimate_tokens(ChatRequest.of("12345678")).input  # the card's one estimator
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (prompt, 2)


async def test_completion_without_usage_is_estimated(serve, adapter) -> None:
    async def quiet(request: web.Request) -> web.Response:
        body = completion("Hello there")
        del body["usage"]
        return web.json_response(body)

    model = adapter(await serve(quiet))
    response = await model.generate(ChatRequest.of("12345678"))
    assert response.text == "Hello there"
    assert response.usage_estimated
    prompt = estimate_tokens(ChatRequest.of("12345678")).input
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, 3)
    assert response.cost_usd == pytest.approx(PRICE.cost(response.usage, 0))


@pytest.mark.parametrize("style", ["openai", "llama_cpp"])
async def test_the_adapter_sends_the_wire_body(serve, adapter, style: JsonSchemaStyle) -> None:
    bodies: list[dict[str, Any]] = []
    answer = json.dumps({"name": "Ada", "age": 36})

    async def keep(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        if body["stream"]:
            return await sse(request, [chunk(answer), chunk(finish="stop")])
        return web.json_response(completion(answer))

    model = adapter(await serve(keep), upstream_model="up", schema_style=style)
    request = ChatRequest.of("A person?", json_schema=PERSON_SCHEMA, stop=("a", "b", "c", "d", "e"))
    assert (await model.generate(request)).text == answer
    _, streamed = split(await collect(model, request))
    assert streamed.text == answer
    assert bodies == [
        from_chat_request(request, "up", stream=False, schema_style=style).body(),
        from_chat_request(request, "up", stream=True, schema_style=style).body(),
    ]


async def test_truncated_json_is_output_truncated(serve, adapter) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["stream"]:
            return await sse(request, [chunk('{"name": "A'), chunk(finish="length")])
        return web.json_response(completion('{"name": "A', finish="length"))

    model = adapter(await serve(cut))
    request = ChatRequest.of("A person?", json_schema=PERSON_SCHEMA, max_tokens=4)
    for call in (model.generate(request), collect(model, request)):
        with pytest.raises(OutputTruncatedError) as caught:
            await call
        assert caught.value.text == '{"name": "A'
        assert "max_tokens=4" in str(caught.value)


async def test_api_key_is_sent_as_bearer(serve, adapter, monkeypatch) -> None:
    seen: list[str | None] = []

    async def guarded(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response(completion("ok"))

    monkeypatch.setenv("SHOAL_TEST_UPSTREAM_KEY", "sk-test-123")
    model = adapter(await serve(guarded), api_key_env="SHOAL_TEST_UPSTREAM_KEY")
    assert (await model.generate(QUESTION)).text == "ok"
    assert seen == ["Bearer sk-test-123"]

    monkeypatch.delenv("SHOAL_TEST_UPSTREAM_KEY")
    with pytest.raises(ConfigError, match="SHOAL_TEST_UPSTREAM_KEY"):
        await model.generate(QUESTION)
    assert len(seen) == 1, "no request goes out without its key"


async def test_no_api_key_sends_no_authorization(serve, adapter) -> None:
    seen: list[str | None] = []

    async def open_door(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response(completion("ok"))

    await adapter(await serve(open_door)).generate(QUESTION)
    assert seen == [None]


async def test_full_queue_raises_overloaded(serve, adapter) -> None:
    async def busy(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.json_response(completion("done"))

    model = adapter(await serve(busy), max_concurrency=1, max_queue=1)
    results = await asyncio.gather(
        *(model.generate(QUESTION) for _ in range(3)), return_exceptions=True
    )
    assert [type(r) for r in results] == [ChatResponse, ChatResponse, OverloadedError]
    overloaded = results[2]
    assert isinstance(overloaded, OverloadedError)
    assert overloaded.retryable
    # The slots and the queue are free again afterwards.
    assert (await model.generate(QUESTION)).text == "done"


async def test_slot_is_released_after_a_timeout(serve, adapter) -> None:
    calls = 0

    async def slow_once(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(2.0)
        return web.json_response(completion("fast"))

    model = adapter(await serve(slow_once), timeout_s=0.2, max_concurrency=1, max_queue=1)
    with pytest.raises(BackendTimeoutError):
        await model.generate(QUESTION)
    assert (await model.generate(QUESTION)).text == "fast"


async def test_a_slow_reader_does_not_time_out_a_fast_stream(serve, adapter) -> None:
    async def quick(request: web.Request) -> web.StreamResponse:
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        return await sse(request, [chunk("a"), chunk("b"), chunk("c"), chunk(usage=usage)])

    model = adapter(await serve(quick), timeout_s=0.3)
    texts = []
    async for event in model.stream(QUESTION):
        if isinstance(event, TextDelta):
            texts.append(event.text)
            await asyncio.sleep(0.2)  # 0.6 s in all: longer than the timeout, spent by the reader
    assert texts == ["a", "b", "c"]


def test_one_model_serves_several_event_loops_without_leaks() -> None:
    """`asyncio.run` per call (as a script might) reuses the model; old sessions are dropped."""
    port = free_port()
    model = OpenAICompatModel(
        card("fake-api", f"http://127.0.0.1:{port}/v1"), base_url=f"http://127.0.0.1:{port}/v1"
    )

    async def call() -> None:
        with pytest.raises(BackendUnavailableError):
            await model.generate(QUESTION)

    asyncio.run(call())
    asyncio.run(call())
    asyncio.run(model.aclose())
    gc.collect()  # an unclosed session would warn here, and warnings are errors


# -- server-sent events, as the standard parses them -------------------------------------------

SPEC_STREAM = (
    b"\xef\xbb\xbf: a byte order mark, a comment, then one event over two data lines\r\n"
    b'data: {"a":\r\n'
    b"data:  1}\r\n"
    b"\r\n"
    b"event: error\n"
    b"id: 7\n"
    b"retry: 1000\n"
    b"data: oops\n"
    b"\n"
    b"event: ping\r"
    b"\r"
    b"data\r"
    b"\r"
    b"data:x\n"
    b"\n"
    b"data: an event the stream ends in the middle of\n"
)
SPEC_EVENTS = [
    ServerSentEvent(event="message", data='{"a":\n 1}'),
    ServerSentEvent(event="error", data="oops"),
    ServerSentEvent(event="message", data=""),  # no data with a name: not dispatched
    ServerSentEvent(event="message", data="x"),
]


def decode(*parts: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for part in parts for event in decoder.feed(part)]


def test_sse_decoder_follows_the_standard() -> None:
    assert decode(SPEC_STREAM) == SPEC_EVENTS


def test_sse_decoder_does_not_care_where_the_bytes_split() -> None:
    assert decode(*(SPEC_STREAM[i : i + 1] for i in range(len(SPEC_STREAM)))) == SPEC_EVENTS
    assert decode(*(b for i in range(len(SPEC_STREAM)) for b in (SPEC_STREAM[i : i + 1], b""))) == (
        SPEC_EVENTS
    )
    for cut in range(len(SPEC_STREAM)):
        assert decode(SPEC_STREAM[:cut], SPEC_STREAM[cut:]) == SPEC_EVENTS, cut


def test_sse_decoder_refuses_what_is_not_utf8() -> None:
    with pytest.raises(BackendError, match="UTF-8"):
        decode(b'data: {"content": "\xff"}\n\n')


@pytest.mark.parametrize(
    "stream",
    [
        b"data: " + b"x" * MAX_EVENT_BYTES,
        (b"data: " + b"x" * (1 << 20) + b"\n") * (MAX_EVENT_BYTES >> 20),
    ],
    ids=["one-long-line", "many-data-lines"],
)
def test_sse_decoder_bounds_an_event(stream: bytes) -> None:
    with pytest.raises(BackendError, match="over"):
        decode(stream)


async def raw_stream(request: web.Request, parts: list[bytes]) -> web.StreamResponse:
    """Answer with exactly these bytes, one write each."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for part in parts:
        await response.write(part)
    await response.write_eof()
    return response


async def test_stream_reads_events_by_the_standard(serve, adapter) -> None:
    first = json.dumps(chunk("Hel"), indent=1).encode().replace(b"\n", b"\r\ndata: ")
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    body = (
        b": keep-alive\r\n\r\n"
        b"data: " + first + b"\r\n\r\n"
        b"event: ping\r\ndata: {}\r\n\r\n"
        b"id: 2\r\ndata: " + json.dumps(chunk("lo")).encode() + b"\r\n\r\n"
        b"data: " + json.dumps(chunk(finish="stop")).encode() + b"\r\n\r\n"
        b": usage next\r\n"
        b"data: " + json.dumps(chunk(usage=usage)).encode() + b"\r\n\r\n"
        b"data: [DONE]\r\n\r\n"
    )
    assert body.count(b"data: ") > 6, "the first chunk spans several data lines"

    async def chatty(request: web.Request) -> web.StreamResponse:
        return await raw_stream(request, [body[i : i + 7] for i in range(0, len(body), 7)])

    deltas, streamed = split(await collect(adapter(await serve(chatty)), QUESTION))
    assert [d.text for d in deltas] == ["Hel", "lo"]
    assert streamed.text == "Hello"
    assert not streamed.usage_estimated
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (7, 2)


@pytest.mark.parametrize(
    "data",
    [b'{"error": {"message": "upstream overloaded", "type": "x"}}', b"upstream overloaded"],
    ids=["openai-body", "text"],
)
async def test_an_error_event_is_backend_error(serve, adapter, data: bytes) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        first = b"data: " + json.dumps(chunk("Hel")).encode() + b"\n\n"
        return await raw_stream(request, [first, b"event: error\ndata: " + data + b"\n\n"])

    model = adapter(await serve(failing))
    seen: list[StreamEvent] = []
    with pytest.raises(BackendError, match="upstream overloaded") as caught:
        async for event in model.stream(QUESTION):
            seen.append(event)
    assert type(caught.value) is BackendError
    assert seen == [TextDelta(text="Hel")]


# -- another shoal upstream ------------------------------------------------------------------

UPSTREAM_PRICE = TokenPrice(input_per_mtok=1_000.0, output_per_mtok=10_000.0)
UNPRICED = TokenPrice(input_per_mtok=0.0, output_per_mtok=0.0)


@pytest.fixture(scope="module")
def upstream_shoal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A shoal gateway on a real socket, serving the route "cheap" over one priced model."""
    engine = Engine(Fleet(), trace_path=tmp_path_factory.mktemp("traces") / "traces.sqlite")
    answer = FunctionModel(
        lambda r: "Paris is the capital", model_id="priced", price=UPSTREAM_PRICE
    )
    engine.add_route("cheap", RoutedModel("cheap", FixedRouter("priced"), [answer]))
    keys = tmp_path_factory.mktemp("keys") / "keys.sqlite"
    with serving(create_app(engine, ServerSettings(auth=False, keys_path=keys))) as url:
        yield url
    asyncio.run(engine.aclose())


@pytest.mark.parametrize("streamed", [False, True], ids=["generate", "stream"])
async def test_an_upstream_shoal_keeps_its_cost_and_decision(
    upstream_shoal: str, adapter, streamed: bool
) -> None:
    async def call(model: OpenAICompatModel) -> ChatResponse:
        if streamed:
            deltas, response = split(await collect(model, QUESTION))
            assert "".join(d.text for d in deltas) == response.text
            return response
        return await model.generate(QUESTION)

    unpriced = await call(adapter(upstream_shoal, upstream_model="cheap", price=UNPRICED))
    priced = await call(adapter(upstream_shoal, upstream_model="cheap"))
    for response in (unpriced, priced):
        assert response.model == "fake-api"
        assert response.text == "Paris is the capital"
        assert response.usage.output_tokens == 4
        assert not response.usage_estimated
        assert response.decision is not None
        assert (response.decision.route, response.decision.models) == ("cheap", ("priced",))
        assert response.decision.reason == "fixed route: always priced"
    # A card with no price of its own takes the upstream's cost; a priced card keeps its own.
    assert unpriced.cost_usd == pytest.approx(UPSTREAM_PRICE.cost(unpriced.usage, 0))
    assert priced.cost_usd == pytest.approx(PRICE.cost(priced.usage, 0))
    assert unpriced.cost_usd > 100 * priced.cost_usd > 0
