"""The endpoints: `/v1/chat/completions`, `/v1/models`, `/healthz`, `/metrics`, `/openapi.json`
(pipeline runs are in `runs`).

A completion goes: API key → body (size-limited) → OpenAI request → `ChatRequest` → model or
route by name (404 lists the valid names) → rate limit → budget reservation of its worst-case
cost → `Engine.generate` or `Engine.stream` (which trace every model call) → settlement to the
actual cost → response. Every completion says what happened in its headers:

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
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import jsonschema
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from shoal.errors import BackendError, ShoalError
from shoal.messages import ChatRequest, ChatResponse, Completed, StreamEvent, TextDelta
from shoal.models.base import worst_case_cost as card_worst_case
from shoal.server import sse
from shoal.server.errors import (
    MalformedRequestError,
    PayloadTooLargeError,
    UnsupportedParameterError,
    error_reply,
)
from shoal.server.keys import PICO, Reservation, partial_cost
from shoal.server.openai_schema import (
    ChatCompletionRequest,
    ChunkWriter,
    ModelInfo,
    ModelList,
    WireModel,
    completion_of,
    to_chat_request,
)

if TYPE_CHECKING:
    from shoal.models.base import Model
    from shoal.server.app import ServerState

log = logging.getLogger(__name__)

T = TypeVar("T")
JSON_TYPE = "application/json"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# -- reading the request -------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLargeError(limit)
        except ValueError:
            raise MalformedRequestError("the Content-Length header is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes) -> tuple[ChatCompletionRequest, ChatRequest]:
    """The OpenAI request in `body` and the `ChatRequest` it asks for."""
    if not body:
        raise MalformedRequestError("the request has no body: send a JSON chat request")
    try:
        wire = ChatCompletionRequest.model_validate_json(body)
        chat = to_chat_request(wire)
    except ValidationError as exc:
        raise _request_error(exc) from None
    if chat.json_schema is not None:
        _check_schema(chat.json_schema)
    return wire, chat


def _check_schema(schema: dict[str, Any]) -> None:
    """A JSON schema must be valid and self-contained (no reference leaves the document)."""
    param = "response_format.json_schema.schema"
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


def _request_error(exc: ValidationError) -> ShoalError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return MalformedRequestError(f"the body is not valid JSON: {first['msg']}")
    unknown = [".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return UnsupportedParameterError(
            f"unsupported parameter(s): {', '.join(unknown)} (shoal does not honour them)",
            param=unknown[0],
        )
    for e in errors:
        if e["type"] == "unsupported_parameter":
            ctx = e.get("ctx") or {}
            return UnsupportedParameterError(
                f"unsupported parameter: {e['msg']}", param=str(ctx.get("param", "")) or None
            )
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]
    )
    param = ".".join(str(p) for p in first["loc"]) or None
    return MalformedRequestError(f"invalid chat request: {problems}", param=param)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(receive: Receive, work: Awaitable[T]) -> T:
    """`await work`, cancelled (raising `ClientGone`) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(receive)
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


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
    """One completion request in flight: what was asked, what is held, how it ends."""

    def __init__(self, state: ServerState, name: str, model: Model, request: ChatRequest) -> None:
        self.state = state
        self.name = name
        self.model = model
        self.request = request
        self.route = name if name in state.engine.route_names else None
        self.started = time.perf_counter()
        self.reservation: Reservation | None = None

    def settle(self, cost_usd: float) -> None:
        if self.reservation is not None and self.state.keys is not None:
            self.state.keys.settle(self.reservation, cost_usd)

    def partial(self, delivered: int) -> float:
        seconds = time.perf_counter() - self.started
        return partial_cost(self.model.card, self.request, delivered=delivered, seconds=seconds)

    def answered(self, response: ChatResponse) -> None:
        self.settle(response.total_cost_usd)
        metrics = self.state.metrics
        metrics.request(
            name=self.name,
            route=self.route,
            model=response.model,
            status="ok",
            latency_s=time.perf_counter() - self.started,
            input_tokens=response.usage.input_tokens,
            output_tokens=response.usage.output_tokens,
            cost_usd=response.total_cost_usd,
        )
        if response.decision is not None:
            metrics.decision(
                route=self.name, model=response.model, target_met=response.decision.target_met
            )
        if self.state.settings.log_prompts:
            log.info("%s answered %r to %r", response.model, response.text, self.request.messages)

    def failed(self, status: str, cost_usd: float = 0.0) -> None:
        self.settle(cost_usd)
        self.state.metrics.request(
            name=self.name,
            route=self.route,
            model=None,
            status=status,
            latency_s=time.perf_counter() - self.started,
        )


def worst_case_cost(state: ServerState, call: Call, model: Model) -> float:
    """The most a call may cost, reserved before it starts.

    A route's own card prices nothing (each answer is costed by the model that gave it): a route
    that gives no bound of its own is bounded by every model of the fleet answering once, what
    the widest cascade over them can do.
    """
    bound = model.worst_case_cost(call.request)
    if bound == 0.0 and call.route is not None:
        fleet = state.engine.fleet
        bound = sum(card_worst_case(fleet.card(m), call.request) for m in fleet.ids)
    return bound


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    key = state.keys.authenticate(request.headers.get("authorization")) if state.keys else None
    body = await read_body(request, state.settings.max_body_bytes)
    wire, chat = parse_request(body)
    model = state.engine.model(wire.model)
    call = Call(state, wire.model, model, chat)
    if state.keys is not None:
        state.keys.admit(key)  # type: ignore[arg-type]
        call.reservation = state.keys.reserve(key, worst_case_cost(state, call, model))
    if wire.stream:
        return await _stream(request, call, wire)
    state.metrics.in_flight += 1
    try:
        response = await _unless_gone(request.receive, state.engine.generate(call.name, chat))
    except ClientGone:
        call.failed("cancelled", call.partial(delivered=0))
        return Response(status_code=499)
    except ShoalError as exc:
        call.failed(error_reply(exc).body.error.code or "error")
        raise
    except BaseException:
        call.failed("cancelled", call.partial(delivered=0))
        raise
    finally:
        state.metrics.in_flight -= 1
    call.answered(response)
    completion = completion_of(
        response,
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        route=call.route,
    )
    return Response(
        completion.model_dump_json(),
        media_type=JSON_TYPE,
        headers={
            "x-shoal-model": response.model,
            "x-shoal-route": route_header(call.route, response),
            "x-shoal-cost-usd": repr(response.total_cost_usd),
            "x-shoal-latency-ms": f"{response.latency_s * 1000:.3f}",
        },
    )


async def _stream(request: Request, call: Call, wire: ChatCompletionRequest) -> Response:
    """Start the stream and wait for its first event, so that a call that fails before its
    first token (overload, context window, unknown schema) gets its HTTP status."""
    state = call.state
    events = cast("AsyncGenerator[StreamEvent, None]", state.engine.stream(call.name, call.request))
    state.metrics.in_flight += 1
    try:
        first = await _unless_gone(request.receive, anext(events))
    except ClientGone:
        await events.aclose()
        state.metrics.in_flight -= 1
        call.failed("cancelled", call.partial(delivered=0))
        return Response(status_code=499)
    except StopAsyncIteration:
        state.metrics.in_flight -= 1
        call.failed("upstream_error")
        raise BackendError(f"{call.name}: the stream ended before it started") from None
    except ShoalError as exc:
        state.metrics.in_flight -= 1
        call.failed(error_reply(exc).body.error.code or "error")
        raise
    except BaseException:
        state.metrics.in_flight -= 1
        call.failed("cancelled", call.partial(delivered=0))
        raise
    writer = ChunkWriter(
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=call.name,
        route=call.route,
        include_usage=wire.include_usage,
        logprobs=call.request.logprobs,
    )
    headers = {"x-shoal-route": route_header(call.route, None)}
    if call.route is None:
        headers["x-shoal-model"] = call.name
    return EventStreamResponse(_events(call, events, first, writer), headers=headers)


async def _events(
    call: Call,
    events: AsyncGenerator[StreamEvent, None],
    first: StreamEvent,
    writer: ChunkWriter,
) -> AsyncGenerator[bytes, None]:
    """The stream's bytes; settles the call however it ends (answered, failed, abandoned)."""
    delivered = 0
    ended = False
    try:
        async with contextlib.aclosing(events):
            event = first
            while True:
                if isinstance(event, TextDelta):
                    delivered += 1
                for chunk in writer.chunks(event):
                    yield sse.encode(sse.Data(chunk))
                if isinstance(event, Completed):
                    ended = True
                    call.answered(event.response)
                    break
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    raise BackendError(
                        f"{call.name}: the stream ended without its answer"
                    ) from None
        yield sse.DONE_BYTES
    except Exception as exc:  # after the first byte, an error can only be an event
        ended = True
        if not isinstance(exc, ShoalError):
            log.error("unexpected %s in the stream of %s", type(exc).__name__, call.name)
        reply = error_reply(exc)
        call.failed(reply.body.error.code or "error", call.partial(delivered) if delivered else 0.0)
        yield sse.encode(sse.Failure(reply.body))
        yield sse.DONE_BYTES
    finally:
        call.state.metrics.in_flight -= 1
        if not ended:  # the client left, or the server is shutting down
            call.failed("cancelled", call.partial(delivered))


class EventStreamResponse(Response):
    """An SSE response that closes its event source however the response ends, and stops as
    soon as the client disconnects (not only at its next write)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[bytes, None], *, headers: dict[str, str]) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump

    async def _pump(self, send: Send) -> None:
        async with contextlib.aclosing(self.body_iterator) as body:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


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
    if state.keys is not None:
        state.metrics.uncharged_usd = state.keys.uncharged_pusd / PICO
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def openapi(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    from shoal.server.openapi import openapi_spec

    spec = openapi_spec(
        names=state.engine.names, auth=state.keys is not None, pipelines=list(state.runs.pipelines)
    )
    return JSONResponse(spec)


ROUTES: list[Route] = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
