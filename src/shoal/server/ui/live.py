"""The dashboard's pages that act: the playground (an answer streamed from any model or route,
charged to the signed-in admin key) and pipeline runs (the list, one run's waterfall, its live
progress over server-sent events, and a form that starts one)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncGenerator
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from shoal.errors import MalformedRequestError, ShoalError
from shoal.ledger import Hold
from shoal.messages import ChatRequest, Completed, Message, StreamEvent, TextDelta
from shoal.pipeline.graph import Pipeline
from shoal.server.errors import error_reply
from shoal.server.http import EventStreamResponse, read_body, request_error
from shoal.server.keys import KeyState
from shoal.server.routes import check_schema_held
from shoal.server.runbook import RunRequest
from shoal.server.runs import launch
from shoal.server.sessions import CSRF_HEADER, Session
from shoal.server.sse import Data, encode
from shoal.server.ui.pages import page
from shoal.server.ui.web import CsrfRefused, checked_form, render, state_of
from shoal.traces import dashboard
from shoal.traces.recordings import Recording

MAX_PROMPT_CHARS = 32_000
MAX_COMPARE = 3
MAX_HISTORY = 64


# -- the playground ------------------------------------------------------------------------------


class Ask(BaseModel):
    """What the playground sends for one answer."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    # The messages before the prompt (a recorded request's system message and earlier turns).
    history: list[Message] = Field(default_factory=list, max_length=MAX_HISTORY)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=128, ge=1, le=4096)
    json_schema: str = ""


class Answered(BaseModel):
    model: str
    cost_usd: float
    latency_s: float
    ttft_s: float | None
    input_tokens: int
    output_tokens: int
    decision: dict[str, Any] | None


class AnswerEvent(BaseModel):
    """One event of a playground answer: a piece of text, the end, or an error."""

    delta: str | None = None
    done: Answered | None = None
    error: str | None = None


@page
async def playground(request: Request, session: Session, key: KeyState) -> Response:
    """The playground; `?recording=ID` opens it on a recorded request (its messages, schema,
    temperature and max tokens)."""
    engine = state_of(request).engine
    wanted = request.query_params.getlist("target")
    prefill = None
    raw = request.query_params.get("recording")
    if raw is not None:
        found = dashboard.recording(engine.traces, int(raw)) if raw.isdigit() else None
        if found is None:
            return render(
                request, "error.html", session, status=404, message=f"no recording {raw!r}"
            )
        prefill = _prefill(found)
        if not wanted and found.target in engine.names:
            wanted = [found.target]
    wanted = wanted or [engine.names[0]]
    return render(
        request,
        "playground.html",
        session,
        names=engine.names,
        routes=set(engine.route_names),
        wanted=[*wanted, "", ""][:MAX_COMPARE],
        max_compare=MAX_COMPARE,
        prefill=prefill,
    )


def _prefill(found: Recording) -> dict[str, Any]:
    """A recorded request as the playground's form: its last user message is the prompt, the
    messages before it the history."""
    users = [i for i, m in enumerate(found.messages) if m["role"] == "user"]
    last = users[-1] if users else len(found.messages)
    return {
        "id": found.id,
        "target": found.target,
        "at": found.created_at,
        "prompt": found.input,
        "history": found.messages[:last],
        # A recording keeps only the parameters that were not the request's defaults.
        "temperature": found.params.get("temperature", _default("temperature")),
        "max_tokens": found.params.get("max_tokens", _default("max_tokens")),
        "json_schema": json.dumps(found.schema, indent=2) if found.schema is not None else "",
    }


def _default(name: str) -> Any:
    return ChatRequest.model_fields[name].default


def _request_of(ask: Ask) -> ChatRequest:
    schema = None
    if ask.json_schema.strip():
        try:
            schema = json.loads(ask.json_schema)
        except json.JSONDecodeError as exc:
            raise MalformedRequestError(
                f"the JSON schema is not valid JSON: {exc.msg} (line {exc.lineno})",
                param="json_schema",
            ) from None
        if not isinstance(schema, dict):
            raise MalformedRequestError("the JSON schema must be an object", param="json_schema")
    return ChatRequest(
        messages=(*ask.history, Message(role="user", content=ask.prompt)),
        temperature=ask.temperature,
        max_tokens=ask.max_tokens,
        json_schema=schema,
    )


@page
async def answer(request: Request, session: Session, key: KeyState) -> Response:
    """Stream one answer (`AnswerEvent`s over SSE), its cost held on the admin's key."""
    if not session.csrf_ok(request.headers.get(CSRF_HEADER)):
        raise CsrfRefused
    state = state_of(request)
    body = await read_body(request, state.settings.max_body_bytes)
    try:
        ask = Ask.model_validate_json(body)
    except ValidationError as exc:
        raise request_error(
            exc, what="playground request", fields="target, prompt, history, temperature, "
            "max_tokens, json_schema",
        ) from None  # fmt: skip
    chat = _request_of(ask)
    plan = await state.engine.plan(ask.target, chat)
    assert state.keys is not None
    state.keys.admit(key)
    hold = state.keys.reserve(key, plan.worst_usd)
    await check_schema_held(chat, hold, state.settings.max_schema_bytes)
    events = cast("AsyncGenerator[StreamEvent, None]", state.engine.stream(plan, hold=hold))

    async def ended() -> None:  # however the response ended, even before its body started
        await events.aclose()
        if not hold.settled:
            hold.release()

    return EventStreamResponse(_answer_bytes(events, hold), headers={}, on_close=ended)


async def _answer_bytes(
    events: AsyncGenerator[StreamEvent, None], hold: Hold
) -> AsyncGenerator[bytes, None]:
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TextDelta):
                    yield encode(Data(AnswerEvent(delta=event.text)))
                elif isinstance(event, Completed):
                    r = event.response
                    done = Answered(
                        model=r.model,
                        cost_usd=r.total_cost_usd,
                        latency_s=r.latency_s,
                        ttft_s=r.ttft_s,
                        input_tokens=r.usage.input_tokens,
                        output_tokens=r.usage.output_tokens,
                        decision=r.decision.model_dump(mode="json") if r.decision else None,
                    )
                    yield encode(Data(AnswerEvent(done=done)))
    except ShoalError as exc:
        yield encode(Data(AnswerEvent(error=error_reply(exc).body.error.message)))
    finally:
        if not hold.settled:
            hold.release()


# -- runs ----------------------------------------------------------------------------------------


@page
async def runs(request: Request, session: Session, key: KeyState) -> Response:
    return _runs_page(request, session)


def _runs_page(
    request: Request, session: Session, *, error: str | None = None, status: int = 200
) -> Response:
    state = state_of(request)
    return render(
        request,
        "runs.html",
        session,
        status=status,
        runs=state.engine.traces.runs(limit=100),
        pipelines=state.runs.pipelines,
        error=error,
    )


def _inputs(pipeline: Pipeline, form: dict[str, str]) -> dict[str, Any]:
    """A form's inputs: each field read as JSON where it is JSON (a number, a list), else as
    the text typed."""
    inputs: dict[str, Any] = {}
    for name in pipeline.inputs:
        raw = form.get(f"input.{name}", "")
        try:
            inputs[name] = json.loads(raw)
        except json.JSONDecodeError:
            inputs[name] = raw
    return inputs


@page
async def run_start(request: Request, session: Session, key: KeyState) -> Response:
    form = await checked_form(request, session)
    state = state_of(request)
    try:
        pipeline = state.runs.pipeline(form.get("pipeline", ""))
        budget = _positive(form.get("budget_usd"), "budget_usd")
        deadline = _positive(form.get("deadline_s"), "deadline_s")
        wire = RunRequest(
            inputs=_inputs(pipeline, form),
            budget_usd=budget if budget is not None else 0.01,
            deadline_s=deadline,
        )
        run = launch(state, pipeline, wire, key)
    except ShoalError as exc:
        return _runs_page(request, session, error=str(exc), status=error_reply(exc).status)
    return RedirectResponse(f"/ui/runs/{run.id}", status_code=303)


def _positive(raw: str | None, name: str) -> float | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        raise MalformedRequestError(f"{name} must be a number, not {raw!r}", param=name) from None
    if not math.isfinite(value) or value <= 0:
        raise MalformedRequestError(f"{name} must be a positive number", param=name)
    return value


@page
async def run_detail(request: Request, session: Session, key: KeyState) -> Response:
    state = state_of(request)
    run_id = request.path_params["run_id"]
    record = state.engine.traces.run(run_id)
    if record is None:
        return render(request, "error.html", session, status=404, message=f"no run {run_id!r}")
    calls = state.engine.traces.calls(run_id)
    start = record.started_at
    end = max([record.finished_at or 0.0, *(c.finished_at for c in calls)]) or start
    total = max(end - start, 1e-6)
    bars = [
        {
            "call": c,
            "left": 100 * max(0.0, c.started_at - start) / total,
            "width": max(0.5, 100 * max(0.0, c.finished_at - c.started_at) / total),
        }
        for c in sorted(calls, key=lambda c: (c.started_at, c.id or 0))
    ]
    live = state.runs.runs.get(run_id)
    return render(
        request,
        "run.html",
        session,
        run=record,
        bars=bars,
        total_s=end - start,
        live=live is not None and live.result is None,
        detail=record.detail,
    )


@page
async def run_events(request: Request, session: Session, key: KeyState) -> Response:
    """A run's progress as it happens (every event so far, then live ones, up to `run_done`)."""
    run = state_of(request).runs.runs.get(request.path_params["run_id"])
    if run is None:
        return Response("this run is not running on this server", status_code=404)

    async def events() -> AsyncGenerator[bytes, None]:
        follow = run.follow()
        async with contextlib.aclosing(follow):
            async for event in follow:
                yield encode(Data(event))

    return EventStreamResponse(events(), headers={})
