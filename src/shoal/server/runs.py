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
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shoal.errors import ConfigError, ShoalError
from shoal.pipeline.graph import Pipeline
from shoal.pipeline.run import RunEvent, Runner, RunResult
from shoal.server import sse
from shoal.server.errors import (
    MalformedRequestError,
    RateLimitedError,
    UnknownPipelineError,
    UnknownRunError,
    UnsupportedParameterError,
)
from shoal.server.keys import KeyState, Reservation
from shoal.server.routes import JSON_TYPE, EventStreamResponse, read_body

if TYPE_CHECKING:
    from shoal.engine import Engine
    from shoal.server.app import ServerState

log = logging.getLogger(__name__)

MAX_RUNS = 16
KEEP_RUNS = 256
MAX_EVENTS = 10_000


# -- the wire ------------------------------------------------------------------------------------


class RunRequest(BaseModel):
    """The body of `POST /v1/pipelines/{name}/runs`."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any]
    budget_usd: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    deadline_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)


RunStatus = Literal["running", "ok", "partial", "failed"]


class RunInfo(BaseModel):
    """A run as the server reports it; `result` once it has finished."""

    id: str
    pipeline: str
    status: RunStatus
    result: RunResult | None = None


class RunEventData(BaseModel):
    """One event of a run's stream; `run_done` carries the result."""

    kind: Literal["step_started", "item_done", "step_done", "run_done"]
    step: str | None = None
    items: int = 0
    detail: dict[str, Any] = {}
    result: RunResult | None = None


# -- the runs an app holds -----------------------------------------------------------------------


class Run:
    """One run: its events as they happen and, at the end, its result."""

    def __init__(self, run_id: str, pipeline: str, key_id: str | None) -> None:
        self.id = run_id
        self.pipeline = pipeline
        self.key_id = key_id
        self.reservation: Reservation | None = None
        self.events: list[RunEventData] = []
        self.result: RunResult | None = None
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def info(self) -> RunInfo:
        status: RunStatus = "running" if self.result is None else self.result.status
        return RunInfo(id=self.id, pipeline=self.pipeline, status=status, result=self.result)

    def add(self, event: RunEventData) -> None:
        if event.kind == "item_done" and len(self.events) >= MAX_EVENTS:
            return
        self.events.append(event)
        self._wake.set()
        self._wake = asyncio.Event()

    def on_event(self, event: RunEvent) -> None:
        """The runner's events; its `run_done` is replaced by one that carries the result."""
        if event.kind != "run_done":
            self.add(
                RunEventData(
                    kind=event.kind, step=event.step, items=event.items, detail=event.detail
                )
            )

    async def follow(self) -> AsyncGenerator[RunEventData, None]:
        """Every event so far, then each new one, up to and including `run_done`."""
        seen = 0
        while True:
            wake = self._wake
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                yield event
                if event.kind == "run_done":
                    return
            await wake.wait()


class RunBook:
    """The pipelines an app serves and its runs: bounded in flight, bounded once finished."""

    def __init__(self, pipelines: Mapping[str, Pipeline], *, max_runs: int, keep_runs: int) -> None:
        self.pipelines = dict(pipelines)
        self.max_runs = max_runs
        self.keep_runs = keep_runs
        self.runs: dict[str, Run] = {}
        self.running = 0
        self._finished: deque[str] = deque()

    def pipeline(self, name: str) -> Pipeline:
        if name not in self.pipelines:
            raise UnknownPipelineError(name, self.pipelines)
        return self.pipelines[name]

    def find(self, pipeline: str, run_id: str, key: KeyState | None) -> Run:
        self.pipeline(pipeline)
        run = self.runs.get(run_id)
        if run is None or run.pipeline != pipeline or run.key_id != (key.id if key else None):
            raise UnknownRunError(pipeline, run_id)
        return run

    def check_room(self) -> None:
        if self.running >= self.max_runs:
            raise RateLimitedError(
                f"the server runs at most {self.max_runs} pipelines at once; retry shortly",
                retry_after_s=1.0,
            )

    def started(self, run: Run) -> None:
        self.runs[run.id] = run
        self.running += 1

    def finished(self, run: Run, result: RunResult) -> None:
        run.result = result
        run.add(RunEventData(kind="run_done", detail={"status": result.status}, result=result))
        self.running -= 1
        self._finished.append(run.id)
        while len(self._finished) > self.keep_runs:
            self.runs.pop(self._finished.popleft(), None)

    async def aclose(self) -> None:
        """Cancel the runs in flight (each settles and records how it ended)."""
        tasks = [run.task for run in self.runs.values() if run.task and not run.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def default_pipelines(engine: Engine) -> dict[str, Pipeline]:
    """The rental pipeline, its routes registered on `engine`; none when the fleet lacks the
    models those routes need (said in the log, and a request for it is a 404 listing none)."""
    from shoal_examples.rental import pipeline as rental

    try:
        rental.register_routes(engine)
    except ConfigError as exc:
        log.warning("not serving the rental pipeline: %s", exc)
        return {}
    pipeline: Pipeline = rental.build()
    return {pipeline.name: pipeline}


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
        if run.reservation is not None and state.keys is not None:
            state.keys.settle(run.reservation, result.cost_usd)
        state.runs.finished(run, result)


def _ended_early(state: ServerState, run: Run, wire: RunRequest, stop: str) -> RunResult:
    """The result of a run that did not finish: what its traced calls cost."""
    traces = state.engine.traces
    cost = 0.0
    try:
        cost = sum(call.cost_usd for call in traces.calls(run.id))
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
        raise _request_error(exc) from None
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


def _request_error(exc: ValidationError) -> ShoalError:
    errors = exc.errors(include_url=False, include_input=False)
    if errors[0]["type"] == "json_invalid":
        return MalformedRequestError(f"the body is not valid JSON: {errors[0]['msg']}")
    unknown = [".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return UnsupportedParameterError(
            f"unknown field(s): {', '.join(unknown)} (a run takes inputs, budget_usd, deadline_s)",
            param=unknown[0],
        )
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]
    )
    param = ".".join(str(p) for p in errors[0]["loc"]) or None
    return MalformedRequestError(f"invalid run request: {problems}", param=param)


# -- the endpoints -------------------------------------------------------------------------------


def _key(state: ServerState, request: Request) -> KeyState | None:
    if state.keys is None:
        return None
    return state.keys.authenticate(request.headers.get("authorization"))


def _json(info: RunInfo, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = info.model_dump_json()
    return Response(body, status_code=status, media_type=JSON_TYPE, headers=headers)


async def start_run(request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    key = _key(state, request)
    pipeline = state.runs.pipeline(request.path_params["name"])
    body = await read_body(request, state.settings.max_body_bytes)
    wire = parse_run_request(body, pipeline, auth=state.keys is not None)
    state.runs.check_room()
    reservation = None
    if state.keys is not None and key is not None:
        state.keys.admit(key)
        reservation = state.keys.reserve(key, wire.budget_usd or 0.0)
    try:
        run_id = state.engine.traces.start_run(
            pipeline.name, budget_usd=wire.budget_usd, deadline_s=wire.deadline_s
        )
    except BaseException:
        if reservation is not None and state.keys is not None:
            state.keys.settle(reservation, 0.0)
        raise
    run = Run(run_id, pipeline.name, key.id if key else None)
    run.reservation = reservation
    state.runs.started(run)
    run.task = asyncio.ensure_future(_execute(state, run, pipeline, wire))
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
            yield sse.encode(sse.Data(event))


RUN_ROUTES: list[Route] = [
    Route("/v1/pipelines/{name}/runs", start_run, methods=["POST"]),
    Route("/v1/pipelines/{name}/runs/{run_id}", read_run, methods=["GET"]),
    Route("/v1/pipelines/{name}/runs/{run_id}/events", run_events, methods=["GET"]),
]
