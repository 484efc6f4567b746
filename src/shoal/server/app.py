"""`create_app(engine, settings)`: the OpenAI-compatible server as a Starlette app.

Everything the app holds hangs off `app.state.shoal` (`ServerState`, in `state`).

    app = create_app(Engine(), ServerSettings(auth=False))  # models and routes, no pipelines
    app = create_app(engine, ServerSettings(pipelines=("rental", "triage.yaml")))
    app = create_app(engine, settings, pipelines={"triage": triage})
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from shoal.engine import Engine
from shoal.errors import PipelineError, ShoalError
from shoal.pipeline import registry
from shoal.pipeline.graph import Pipeline
from shoal.server.errors import ErrorReply, error_reply, http_error_reply
from shoal.server.keys import KeyStore
from shoal.server.metrics import Metrics
from shoal.server.routes import ROUTES
from shoal.server.runbook import KEEP_RUNS, MAX_RUNS, RunBook
from shoal.server.runs import RUN_ROUTES
from shoal.server.sessions import Sessions
from shoal.server.state import KEYS_FILE, ServerState
from shoal.server.ui import ui_routes
from shoal.settings import ServerSettings

log = logging.getLogger(__name__)


def _reply(reply: ErrorReply, request: Request) -> Response:
    state: ServerState = request.app.state.shoal
    state.metrics.error(status=reply.status, code=reply.body.error.code or "")
    return Response(
        reply.body.model_dump_json(),
        status_code=reply.status,
        media_type="application/json",
        headers=reply.headers,
    )


async def _shoal_error(request: Request, exc: Exception) -> Response:
    return _reply(error_reply(exc), request)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _reply(http_error_reply(exc.status_code, exc.detail), request)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # The message may quote a prompt: log the type and traceback only at debug level.
    log.error("unexpected %s answering %s", type(exc).__name__, request.url.path)
    log.debug("traceback", exc_info=exc)
    return _reply(error_reply(exc), request)


def named_pipelines(engine: Engine, names: Sequence[str]) -> dict[str, Pipeline]:
    """The pipelines an operator named (registered names or YAML files), by pipeline name; a
    name that cannot be loaded, or two that give one pipeline name, is an error."""
    pipelines: dict[str, Pipeline] = {}
    for target in names:
        pipeline = registry.load(target, engine)
        if pipeline.name in pipelines:
            raise PipelineError(f"two pipelines named {pipeline.name!r} (the second from {target})")
        pipelines[pipeline.name] = pipeline
    return pipelines


def create_app(
    engine: Engine,
    settings: ServerSettings | None = None,
    *,
    pipelines: Mapping[str, Pipeline] | None = None,
    max_runs: int = MAX_RUNS,
    keep_runs: int = KEEP_RUNS,
    close_engine: bool = False,
    keys: KeyStore | None = None,
) -> Starlette:
    """The server for `engine`. It runs `pipelines` by name (by default those `settings.pipelines`
    names, registered pipelines or YAML files; none when it names none), at most `max_runs` at
    once, and keeps the last `keep_runs` finished runs readable. Nothing is added to `engine`
    unless a named registered pipeline adds the routes it needs (as the rental one does). With
    `close_engine`, the app closes the engine when it stops (the command line hands it over);
    otherwise the caller keeps it. With API keys, the app holds its keys file from now until it
    stops: `KeysInUseError` if another server does, unless `keys` is given: a store whose budgets
    another process owns (the gateway replicas on Ray share one ledger)."""
    settings = settings or ServerSettings()
    if pipelines is None:
        pipelines = named_pipelines(engine, settings.pipelines)
    runs = RunBook(pipelines, max_runs=max_runs, keep_runs=keep_runs)
    if settings.auth and keys is None:
        keys = KeyStore(settings.keys_path or engine.fleet.cache_dir / KEYS_FILE, serving=True)
    metrics = Metrics()
    metrics.watch_routes(lambda: [engine.route(name) for name in engine.route_names])
    # The dashboard's sessions live in the keys file, so they outlast a restart.
    sessions = Sessions(keys.path) if keys is not None else Sessions()
    state = ServerState(
        engine=engine, settings=settings, keys=keys, metrics=metrics, runs=runs, sessions=sessions
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await runs.aclose()  # runs in flight settle their keys' reservations first
            sessions.close()
            if keys is not None:
                keys.close()
            if close_engine:
                await engine.aclose()

    app = Starlette(
        routes=[*ROUTES, *RUN_ROUTES, *ui_routes()],
        exception_handlers={
            ShoalError: _shoal_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.shoal = state
    return app
