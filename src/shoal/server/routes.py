"""The endpoints: `/v1/chat/completions`, `/v1/models`, `/healthz`, `/metrics`, `/openapi.json`
(pipeline runs are in `runs`).

A completion goes: API key → body (size-limited) → OpenAI request → `ChatRequest` → the
engine's plan for the model or route name (404 lists the valid names; a route decides here,
once) → rate limit → a hold of the plan's worst-case cost on the key's ledger account →
`Engine.stream` of that plan (collected for a plain call), which caps the call at the hold,
settles the hold to what the call cost and traces the same figures → response. Every
completion says what happened in its headers:

    x-shoal-model       the model that answered
    x-shoal-route       JSON: the route's decision ({"route", "models", "reason", "target_met",
                        "decision_s"}), `{"route": name}` for a route that gave none, `null` for
                        a direct model call
    x-shoal-cost-usd    what the call cost, every model of a cascade included
    x-shoal-latency-ms  the model call's wall time, as the trace store records it

A stream's headers leave before its answer exists, so they carry what is known then (the model
when a model id was asked for, and the route); the final figures ride on the last chunk's
`shoal` object (the usage chunk when `stream_options.include_usage` is set).

A client that disconnects cancels its generation: the call is cancelled and, for a stream, the
engine's stream is closed, which stops a local model between two tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

import jsonschema
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shoal.calls import CallPlan
from shoal.errors import BackendError, MalformedRequestError, ShoalError
from shoal.ledger import Account, Hold, to_usd
from shoal.messages import ChatRequest, ChatResponse, Completed, StreamEvent, TextDelta
from shoal.openai_wire import (
    ChatCompletionRequest,
    ChunkWriter,
    ModelInfo,
    ModelList,
    WireModel,
    completion_of,
    to_chat_request,
)
from shoal.server.errors import error_reply
from shoal.server.http import (
    JSON_TYPE,
    ClientGone,
    EventStreamResponse,
    read_body,
    request_error,
    unless_gone,
)
from shoal.server.openapi import openapi_spec
from shoal.server.sse import DONE_BYTES, KEEP_ALIVE_BYTES, Data, Failure, encode
from shoal.server.state import ServerState

log = logging.getLogger(__name__)

# How long a stream waits for its first event before sending its headers (a failure by then is
# an HTTP error status; after, an error event), and how often a silent stream says it is alive.
FIRST_EVENT_GRACE_S = 0.25
KEEP_ALIVE_S = 2.0
# Bodies larger than this are parsed in a worker thread.
LARGE_BODY_BYTES = 64 * 1024


# -- reading the request -------------------------------------------------------------------------


def parse_request(body: bytes) -> tuple[ChatCompletionRequest, ChatRequest]:
    """The OpenAI request in `body` and the `ChatRequest` it asks for."""
    if not body:
        raise MalformedRequestError("the request has no body: send a JSON chat request")
    try:
        wire = ChatCompletionRequest.model_validate_json(body)
        chat = to_chat_request(wire)
    except ValidationError as exc:
        raise request_error(exc, what="chat request") from None
    return wire, chat


async def check_schema_held(chat: ChatRequest, hold: Hold, limit: int) -> None:
    """`check_schema` on the request's schema, if it has one, off the event loop; a schema
    refused gives back what `hold` reserved."""
    if chat.json_schema is None:
        return
    try:
        await asyncio.to_thread(check_schema, chat.json_schema, limit)
    except BaseException:
        hold.release()
        raise


def check_schema(schema: dict[str, Any], limit: int) -> None:
    """A JSON schema must be at most `limit` bytes of JSON, valid, and self-contained (no
    reference leaves the document). Checking a large schema takes seconds of CPU: the server
    calls this off the event loop, after the key's rate limit and budget let the call in."""
    param = "response_format.json_schema.schema"
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > limit:
        raise MalformedRequestError(
            f"the JSON schema is {size} bytes, over the limit of {limit} bytes "
            "(response_format.json_schema)",
            param=param,
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise MalformedRequestError(
            f"not a valid JSON schema: {exc.message}", param=param
        ) from None
    refs = [v for v in _values(schema, "$ref") if not (isinstance(v, str) and v.startswith("#"))]
    if refs:
        raise MalformedRequestError(
            "the JSON schema refers outside itself ($ref must start with '#')", param=param
        )


def _values(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v, key)


# -- headers -------------------------------------------------------------------------------------


def route_header(route: str | None, response: ChatResponse | None) -> str:
    if route is None:
        return "null"
    decision = response.decision if response is not None else None
    if decision is None:
        return json.dumps({"route": route})
    return json.dumps(
        {
            "route": decision.route,
            "models": list(decision.models),
            "reason": decision.reason,
            "target_met": decision.target_met,
            "decision_s": decision.decision_s,
        }
    )


# -- completions ---------------------------------------------------------------------------------


class Call:
    """One completion request in flight: its plan, the money held for it, how it ends.

    `begin` and `end` bracket it once each (`end` is idempotent), so the in-flight gauge and the
    request metrics are kept in one place whichever way the call ends."""

    def __init__(self, state: ServerState, plan: CallPlan, hold: Hold) -> None:
        self.state = state
        self.plan = plan
        self.hold = hold
        self.started = time.perf_counter()
        self.ended = False

    def begin(self) -> None:
        self.state.metrics.in_flight += 1

    def end(self, status: str, response: ChatResponse | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if not self.hold.settled:  # the engine never started the call (the client left first)
            self.hold.release()
        metrics = self.state.metrics
        metrics.in_flight -= 1
        metrics.request(
            name=self.plan.name,
            route=self.plan.route,
            model=response.model if response is not None else None,
            status=status,
            latency_s=time.perf_counter() - self.started,
            input_tokens=response.usage.input_tokens if response is not None else 0,
            output_tokens=response.usage.output_tokens if response is not None else 0,
            cost_usd=to_usd(self.hold.charged_pusd or 0),
        )
        if response is None:
            return
        if response.decision is not None:
            metrics.decision(
                route=self.plan.name, model=response.model, target_met=response.decision.target_met
            )
        if self.state.settings.log_prompts:
            log.info(
                "%s answered %r to %r", response.model, response.text, self.plan.request.messages
            )

    def failed(self, exc: BaseException) -> None:
        self.end(error_reply(exc).body.error.code or "error")


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    key = state.keys.authenticate(request.headers.get("authorization")) if state.keys else None
    if key is not None and state.keys is not None:
        await state.keys.admit_async(key)  # the rate limit, before any work on the body
    body = await read_body(request, state.settings.max_body_bytes)
    if len(body) > LARGE_BODY_BYTES:  # parsing a large body takes milliseconds: off the loop
        wire, chat = await asyncio.to_thread(parse_request, body)
    else:
        wire, chat = parse_request(body)
    plan = await state.engine.plan(wire.model, chat)
    if key is not None and state.keys is not None:
        hold = await state.keys.reserve_async(key, plan.worst_usd)
    else:  # no keys: the call is still capped at its worst case and its charge measured
        hold = Account("unmetered").reserve(plan.worst_usd)
    await check_schema_held(chat, hold, state.settings.max_schema_bytes)
    call = Call(state, plan, hold)
    if wire.stream:
        return await _stream(request, call, wire)
    call.begin()
    try:
        response = await unless_gone(request.receive, state.engine.execute(plan, hold=hold))
    except ClientGone:
        call.end("cancelled")
        return Response(status_code=499)
    except ShoalError as exc:
        call.failed(exc)
        raise
    except BaseException:
        call.end("cancelled")
        raise
    call.end("ok", response)
    completion = completion_of(
        response,
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        route=plan.route,
    )
    return Response(
        completion.model_dump_json(),
        media_type=JSON_TYPE,
        headers={
            "x-shoal-model": response.model,
            "x-shoal-route": route_header(plan.route, response),
            "x-shoal-cost-usd": repr(response.total_cost_usd),
            "x-shoal-latency-ms": f"{response.latency_s * 1000:.3f}",
        },
    )


async def _stream(request: Request, call: Call, wire: ChatCompletionRequest) -> Response:
    """Start the stream and wait a moment for its first event, so that a call that fails at
    once (overload, context window, unknown schema) gets its HTTP status; a call that is still
    working after `FIRST_EVENT_GRACE_S` gets its headers and keep-alive comments instead."""
    state, plan = call.state, call.plan
    events = cast("AsyncGenerator[StreamEvent, None]", state.engine.stream(plan, hold=call.hold))
    call.begin()
    pending: asyncio.Future[StreamEvent] = asyncio.ensure_future(anext(events))

    async def ended() -> None:  # a stream left before its body ran
        await _close(pending, events)
        call.end("cancelled")

    try:
        await unless_gone(request.receive, asyncio.wait({pending}, timeout=FIRST_EVENT_GRACE_S))
        if pending.done():
            pending.result()  # a failure before the first event is an HTTP error
    except ClientGone:
        await ended()
        return Response(status_code=499)
    except StopAsyncIteration:
        call.end("upstream_error")
        raise BackendError(f"{plan.name}: the stream ended before it started") from None
    except ShoalError as exc:
        call.failed(exc)
        raise
    except BaseException:
        await ended()
        raise
    writer = ChunkWriter(
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=plan.name,
        route=plan.route,
        include_usage=wire.include_usage,
        logprobs=plan.request.logprobs,
    )
    headers = {"x-shoal-route": route_header(plan.route, None)}
    if plan.route is None:
        headers["x-shoal-model"] = plan.name
    return EventStreamResponse(
        _events(call, events, pending, writer), headers=headers, on_close=ended
    )


async def _close(
    pending: asyncio.Future[StreamEvent], events: AsyncGenerator[StreamEvent, None]
) -> None:
    """Stop a stream whose next event is awaited (the engine settles what it did)."""
    if not pending.done():
        pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)
    await events.aclose()


async def _events(
    call: Call,
    events: AsyncGenerator[StreamEvent, None],
    pending: asyncio.Future[StreamEvent],
    writer: ChunkWriter,
) -> AsyncGenerator[bytes, None]:
    """The stream's bytes, with a keep-alive comment at once when the first event is not ready
    and every `KEEP_ALIVE_S` of silence after; the call ends however the stream does
    (answered, failed, left)."""
    try:
        if not pending.done():
            yield KEEP_ALIVE_BYTES
        while True:
            while not (await asyncio.wait({pending}, timeout=KEEP_ALIVE_S))[0]:
                yield KEEP_ALIVE_BYTES
            try:
                event = pending.result()
            except StopAsyncIteration:
                raise BackendError(
                    f"{call.plan.name}: the stream ended without its answer"
                ) from None
            if isinstance(event, TextDelta | Completed):
                for chunk in writer.chunks(event):
                    yield encode(Data(chunk))
            if isinstance(event, Completed):
                call.end("ok", event.response)
                break
            pending = asyncio.ensure_future(anext(events))
        yield DONE_BYTES
    except Exception as exc:  # after the first byte, an error can only be an event
        if not isinstance(exc, ShoalError):
            log.error("unexpected %s in the stream of %s", type(exc).__name__, call.plan.name)
        call.failed(exc)
        yield encode(Failure(error_reply(exc).body))
        yield DONE_BYTES
    finally:
        await _close(pending, events)
        call.end("cancelled")  # the client left, or the server is shutting down


# -- the other endpoints -------------------------------------------------------------------------


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    if state.keys is not None:
        state.keys.authenticate(request.headers.get("authorization"))
    engine = state.engine
    routes = set(engine.route_names)
    data: list[WireModel] = []
    for name in engine.names:
        if name in routes:
            info = ModelInfo(kind="route")
        else:
            card = engine.fleet.card(name)
            info = ModelInfo(kind="model", context=card.context, runs=card.runs, tier=card.tier)
        data.append(WireModel(id=name, shoal=info))
    return Response(ModelList(data=data).model_dump_json(), media_type=JSON_TYPE)


async def healthz(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    engine = state.engine
    return JSONResponse(
        {"status": "ok", "models": len(engine.fleet.ids), "routes": len(engine.route_names)}
    )


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    if state.keys is not None and state.settings.metrics_auth:
        state.keys.authenticate(request.headers.get("authorization"))
    if state.keys is not None:
        state.metrics.overrun_usd = to_usd(state.keys.overrun_pusd)
    body, media_type = state.metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=media_type)


async def openapi(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    spec = openapi_spec(
        names=state.engine.names,
        auth=state.keys is not None,
        pipelines=list(state.runs.pipelines),
        metrics_auth=state.keys is not None and state.settings.metrics_auth,
    )
    return JSONResponse(spec)


ROUTES: list[Route] = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
