"""Pipeline runs over HTTP: start one, read its status and result, follow its progress.

    POST /v1/pipelines/{name}/runs             {"inputs": {...}, "budget_usd": 0.01,
                                                "deadline_s": 60}
                                               -> 202 {"id", "pipeline", "status": "running"}
    GET  /v1/pipelines/{name}/runs/{id}        -> {"id", "pipeline", "status", "result"}
    GET  /v1/pipelines/{name}/runs/{id}/events -> SSE: the run's events so far, then live ones;
                                                  the last is `run_done`, carrying the result

A run is a task on the server's event loop (`Runner` over the engine, traced like any run). Its
id is its trace run's id, started before the 202 leaves, so a GET right after the POST finds it.
Its `status` is `running`, then the result's (`ok`, `partial`, `failed`).

With API keys, `budget_usd` is required: it is reserved against the key's budget when the run
starts (402 when the key cannot cover it, 429 while calls in flight hold it) and settled to the
run's actual cost when it ends. A run is visible only to the key that started it.

Bounds: at most `max_runs` runs in flight (429 with Retry-After beyond); the last `keep_runs`
finished runs stay readable; a run keeps at most `MAX_EVENTS` events (its `item_done` events
are dropped past that, never its step or `run_done` events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shoal.errors import MalformedRequestError
from shoal.ledger import to_pico, to_usd
from shoal.pipeline.graph import Pipeline
from shoal.pipeline.run import Runner, RunResult
from shoal.server.http import JSON_TYPE, EventStreamResponse, read_body, request_error
from shoal.server.keys import KeyState
from shoal.server.runbook import Run, RunInfo, RunRequest
from shoal.server.sse import Data, encode
from shoal.server.state import ServerState

log = logging.getLogger(__name__)


# -- running one ---------------------------------------------------------------------------------


async def _execute(state: ServerState, run: Run, pipeline: Pipeline, wire: RunRequest) -> None:
    engine = state.engine
    result: RunResult | None = None
    stop = "cancelled: the server stopped"
    try:
        result = await Runner(engine, traces=engine.traces).run(
            pipeline,
            wire.inputs,
            budget_usd=wire.budget_usd,
            deadline_s=wire.deadline_s,
            on_event=run.on_event,
            run_id=run.id,
        )
    except Exception as exc:
        # The message may quote an input: log the type, and the traceback only at debug level.
        log.error("run %s of %s failed: unexpected %s", run.id, pipeline.name, type(exc).__name__)
        log.debug("traceback", exc_info=exc)
        stop = f"internal error ({type(exc).__name__})"
    finally:
        if result is None:
            result = _ended_early(state, run, wire, stop)
        if run.hold is not None:  # the key pays what the run's calls were charged
            run.hold.settle(to_pico(result.cost_usd))
        state.runs.finished(run, result)


def _ended_early(state: ServerState, run: Run, wire: RunRequest, stop: str) -> RunResult:
    """The result of a run that did not finish: what its traced calls cost."""
    traces = state.engine.traces
    cost = 0.0
    try:
        cost = to_usd(sum(to_pico(call.cost_usd) for call in traces.calls(run.id)))
        traces.finish_run(run.id, "failed", {"stop_reason": stop})
    except Exception as exc:  # the store may be closing with the server
        log.error("could not record how run %s ended: %s", run.id, exc)
    return RunResult(
        run_id=run.id,
        pipeline=run.pipeline,
        status="failed",
        stop_reason=stop,
        cost_usd=cost,
        budget_usd=wire.budget_usd,
        deadline_s=wire.deadline_s,
    )


def parse_run_request(body: bytes, pipeline: Pipeline, *, auth: bool) -> RunRequest:
    if not body:
        raise MalformedRequestError('the request has no body: send {"inputs": {...}}')
    try:
        wire = RunRequest.model_validate_json(body)
    except ValidationError as exc:
        raise request_error(
            exc, what="run request", fields="inputs, budget_usd, deadline_s"
        ) from None
    missing = [name for name in pipeline.inputs if name not in wire.inputs]
    extra = sorted(set(wire.inputs) - set(pipeline.inputs))
    if missing or extra:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unknown {', '.join(extra)}"] if extra else []
        raise MalformedRequestError(
            f"pipeline {pipeline.name!r} takes inputs {', '.join(pipeline.inputs) or '(none)'}: "
            + "; ".join(problems),
            param="inputs",
        )
    if auth and wire.budget_usd is None:
        raise MalformedRequestError(
            "budget_usd is required: it is reserved against the key's budget", param="budget_usd"
        )
    return wire


# -- the endpoints -------------------------------------------------------------------------------


def _key(state: ServerState, request: Request) -> KeyState | None:
    if state.keys is None:
        return None
    return state.keys.authenticate(request.headers.get("authorization"))


def _json(info: RunInfo, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = info.model_dump_json()
    return Response(body, status_code=status, media_type=JSON_TYPE, headers=headers)


def launch(state: ServerState, pipeline: Pipeline, wire: RunRequest, key: KeyState | None) -> Run:
    """Start a run of `pipeline` (its budget held on `key`, which may see it): 429 when the
    server runs as many as it may, or the key's rate limit or budget refuses it."""
    state.runs.check_room()
    hold = None
    if state.keys is not None and key is not None:
        state.keys.admit(key)
        hold = state.keys.reserve(key, wire.budget_usd or 0.0)
    try:
        run_id = state.engine.traces.start_run(
            pipeline.name, budget_usd=wire.budget_usd, deadline_s=wire.deadline_s
        )
    except BaseException:
        if hold is not None:
            hold.release()
        raise
    run = Run(run_id, pipeline.name, key.id if key else None)
    run.hold = hold
    state.runs.started(run)
    run.task = asyncio.ensure_future(_execute(state, run, pipeline, wire))
    return run


async def start_run(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    key = _key(state, request)
    pipeline = state.runs.pipeline(request.path_params["name"])
    body = await read_body(request, state.settings.max_body_bytes)
    wire = parse_run_request(body, pipeline, auth=state.keys is not None)
    run = launch(state, pipeline, wire, key)
    location = f"/v1/pipelines/{pipeline.name}/runs/{run.id}"
    return _json(run.info(), 202, {"location": location})


async def read_run(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    key = _key(state, request)
    run = state.runs.find(request.path_params["name"], request.path_params["run_id"], key)
    return _json(run.info())


async def run_events(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    key = _key(state, request)
    run = state.runs.find(request.path_params["name"], request.path_params["run_id"], key)
    return EventStreamResponse(_event_bytes(run), headers={})


async def _event_bytes(run: Run) -> AsyncGenerator[bytes, None]:
    events = run.follow()
    async with contextlib.aclosing(events):
        async for event in events:
            yield encode(Data(event))


RUN_ROUTES: list[Route] = [
    Route("/v1/pipelines/{name}/runs", start_run, methods=["POST"]),
    Route("/v1/pipelines/{name}/runs/{run_id}", read_run, methods=["GET"]),
    Route("/v1/pipelines/{name}/runs/{run_id}/events", run_events, methods=["GET"]),
]
